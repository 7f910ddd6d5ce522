"""Sample info: per-sample token counts and locations, saved as one ``.npz``.

``.npz`` keys (N = kept samples, S = skipped lines, F = files); no pickled objects:

==================  ==============  ====================================================
key                 dtype / shape   meaning
==================  ==============  ====================================================
lengths             int32 [N]       tokens per sample after templating (and truncation)
loss_tokens         int32 [N]       tokens with loss mask 1
source              int32 [N]       index into ``files``
offset              int64 [N]       byte offset of the sample's line (decompressed stream)
line                int64 [N]       1-based line number
crc32               uint32 [N]      zlib.crc32 of the line's bytes (guards random access)
truncated           bool [N]        the sample was cut to ``max_length``
files               str [F]         absolute paths of the data files
skipped             struct [S]      fields ``source`` int32, ``line`` int64, ``reason`` str
fingerprint         str (0-d)       hash of ``fingerprint_inputs``
fingerprint_inputs  str (0-d)       JSON: files (size, mtime_ns[, sha256]), tokenizer sha256,
                                    template (+version), max_length, overflow, on_error
tokenizer           str (0-d)       tokenizer path used
template            str (0-d)       chat template name
max_length          int64 (0-d)     -1 when unlimited
truncate            bool (0-d)      over-long samples were truncated (else dropped)
stats               str (0-d)       JSON counters of the run (skipped by reason, ...)
format_version      int64 (0-d)     layout version of this file
==================  ==============  ====================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_hbp.data.templates import TEMPLATE_VERSION
from megatron_hbp.data.tokenizer import file_sha256

__all__ = [
    "SampleInfo",
    "SkippedRecord",
    "load_sample_info",
    "save_sample_info",
    "fingerprint_inputs",
    "fingerprint_of",
    "describe_changes",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
SKIPPED_DTYPE = np.dtype([("source", np.int32), ("line", np.int64), ("reason", "U200")])


@dataclass(frozen=True)
class SkippedRecord:
    """One skipped line: ``file`` path, 1-based ``line``, ``reason``."""

    file: str
    line: int
    reason: str


@dataclass
class SampleInfo:
    """Per-sample arrays (length N) plus provenance; see the module docstring for the layout."""

    lengths: np.ndarray
    loss_tokens: np.ndarray
    source: np.ndarray
    offset: np.ndarray
    line: np.ndarray
    crc32: np.ndarray
    truncated: np.ndarray
    files: list[str]
    fingerprint: str
    fingerprint_inputs: dict
    tokenizer: str
    template: str
    max_length: int | None
    truncate: bool
    skipped_array: np.ndarray = field(default_factory=lambda: np.zeros(0, SKIPPED_DTYPE))
    stats: dict = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def skipped(self) -> list[SkippedRecord]:
        """Skipped lines as records (file path, line, reason)."""
        return [
            SkippedRecord(self.files[int(r["source"])], int(r["line"]), str(r["reason"]))
            for r in self.skipped_array
        ]

    def __post_init__(self):
        n = self.lengths.shape[0]
        for name in ("loss_tokens", "source", "offset", "line", "crc32", "truncated"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"sample info: {name} has shape {getattr(self, name).shape}, expected ({n},)"
                )


def save_sample_info(info: SampleInfo, path: str | os.PathLike) -> Path:
    """Write ``info`` to ``path`` atomically (temporary file in the same folder, then rename),
    so an interrupted run never leaves a file that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "lengths": np.asarray(info.lengths, np.int32),
        "loss_tokens": np.asarray(info.loss_tokens, np.int32),
        "source": np.asarray(info.source, np.int32),
        "offset": np.asarray(info.offset, np.int64),
        "line": np.asarray(info.line, np.int64),
        "crc32": np.asarray(info.crc32, np.uint32),
        "truncated": np.asarray(info.truncated, bool),
        "files": np.asarray(info.files, dtype=str) if info.files else np.zeros(0, "U1"),
        "skipped": np.asarray(info.skipped_array, SKIPPED_DTYPE),
        "fingerprint": np.array(info.fingerprint),
        "fingerprint_inputs": np.array(json.dumps(info.fingerprint_inputs, sort_keys=True)),
        "tokenizer": np.array(info.tokenizer),
        "template": np.array(info.template),
        "max_length": np.array(-1 if info.max_length is None else info.max_length, np.int64),
        "truncate": np.array(bool(info.truncate)),
        "stats": np.array(json.dumps(info.stats, sort_keys=True)),
        "format_version": np.array(FORMAT_VERSION, np.int64),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_REQUIRED = ("lengths", "loss_tokens", "source", "offset", "line", "files", "fingerprint", "format_version")


def load_sample_info(path: str | os.PathLike) -> SampleInfo:
    """Read a ``.npz`` written by :func:`save_sample_info` (no pickle). Raises ``FileNotFoundError``
    or ``ValueError`` (with the fix) for a missing file, a foreign ``.npz`` or another layout version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sample info {path} does not exist; create it with tools/preprocess_lengths.py"
        )
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in _REQUIRED if k not in z.files]
        if missing:
            raise ValueError(
                f"{path} is not a sample-info file (missing {missing}); rerun tools/preprocess_lengths.py"
            )
        version = int(z["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path} has sample-info format {version}, this code reads {FORMAT_VERSION}; "
                "rerun tools/preprocess_lengths.py"
            )
        max_length = int(z["max_length"])
        return SampleInfo(
            lengths=z["lengths"],
            loss_tokens=z["loss_tokens"],
            source=z["source"],
            offset=z["offset"],
            line=z["line"],
            crc32=z["crc32"],
            truncated=z["truncated"],
            files=[str(f) for f in z["files"]],
            fingerprint=str(z["fingerprint"]),
            fingerprint_inputs=json.loads(str(z["fingerprint_inputs"])),
            tokenizer=str(z["tokenizer"]),
            template=str(z["template"]),
            max_length=None if max_length < 0 else max_length,
            truncate=bool(z["truncate"]),
            skipped_array=z["skipped"],
            stats=json.loads(str(z["stats"])),
            path=str(path),
        )


def fingerprint_inputs(
    files: list[Path],
    tokenizer_path: str | os.PathLike,
    template: str,
    max_length: int | None,
    overflow: str,
    on_error: str,
    *,
    content_hash: bool = False,
) -> dict:
    """Everything the sample info depends on. Files are identified by path, size and mtime
    (``content_hash=True`` uses size and a SHA-256 of the bytes instead of the mtime: slower,
    but exact, and survives copies that change mtimes); the tokenizer by the SHA-256 of its file."""
    entries = []
    for f in files:
        st = os.stat(f)
        if content_hash:
            e = {"path": str(f), "size": st.st_size, "sha256": file_sha256(f)}
        else:
            e = {"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entries.append(e)
    return {
        "format_version": FORMAT_VERSION,
        "files": entries,
        "tokenizer_sha256": file_sha256(tokenizer_path),
        "template": template,
        "template_version": TEMPLATE_VERSION,
        "max_length": max_length,
        "overflow": overflow,
        "on_error": on_error,
    }


def fingerprint_of(inputs: dict) -> str:
    """32-hex-digit hash of the fingerprint inputs (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable list of what differs between two fingerprint-input dicts."""
    out = []
    old_files = {e["path"]: e for e in old.get("files", [])}
    new_files = {e["path"]: e for e in new.get("files", [])}
    for p in new_files:
        if p not in old_files:
            out.append(f"new file {p}")
        elif old_files[p] != new_files[p]:
            what = [k for k in new_files[p] if old_files[p].get(k) != new_files[p][k]]
            out.append(f"file {p} changed ({', '.join(what)})")
    out += [f"file {p} removed" for p in old_files if p not in new_files]
    if [e["path"] for e in old.get("files", [])] != list(new_files) and not out:
        out.append("file order changed")
    for k in sorted(set(old) | set(new)):
        if k != "files" and old.get(k) != new.get(k):
            out.append(f"{k}: {old.get(k)!r} -> {new.get(k)!r}")
    return out
