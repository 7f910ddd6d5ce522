"""Random-access SFT samples: read one line by its stored byte offset and tokenise it.

``SFTDataset(sample_info)[i]`` seeks to ``offset[i]`` in ``files[source[i]]``, reads that one
line, checks its CRC32 against the one recorded at preprocessing time, applies the same
template and truncation, and checks the token count against ``lengths[i]``. Any mismatch
raises :class:`DataChangedError` naming the file and line, so a changed file can never be
read silently at the wrong place.

Gzipped files (``.jsonl.gz``): gzip has no random access, so the offsets stored by
preprocessing refer to the decompressed stream and the dataset decompresses each ``.gz`` file
once into a cache folder (default: ``.decompressed/`` beside the sample-info file), named after
the compressed file's path, size and mtime, written atomically. Seeking in that plain copy is
O(1); the per-line CRC check catches a stale or wrong copy.

File handles are opened lazily in each process (after a fork, a worker reopens its own), and
pickling drops them: the dataset is cheap to send to DataLoader workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_hbp.data.formats import LineError, decompress_file, is_gzip_path, parse_line
from megatron_hbp.data.sample_info import SampleInfo, load_sample_info
from megatron_hbp.data.templates import CompiledTemplate
from megatron_hbp.data.tokenizer import Tokenizer, file_sha256, load_tokenizer

__all__ = ["SFTDataset", "Sample", "DataChangedError"]

log = logging.getLogger("megatron_hbp.data")


class DataChangedError(RuntimeError):
    """A data file no longer matches its sample info (rerun tools/preprocess_lengths.py)."""


@dataclass
class Sample:
    """One tokenised sample: ``input_ids`` int32 ``[L]``, ``loss_mask`` uint8 ``[L]`` (1 on
    assistant tokens and each assistant turn's end token), ``index`` in the dataset."""

    index: int
    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class SFTDataset:
    """Samples of a sample-info file (path or :class:`SampleInfo`), tokenised on access.

    ``tokenizer``: defaults to the file recorded in the sample info; one passed explicitly must
    have the same file contents (SHA-256), else ``ValueError``. ``cache_dir``: where
    decompressed copies of ``.gz`` files go.
    """

    def __init__(
        self,
        sample_info_or_path: SampleInfo | str | os.PathLike,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
    ):
        info = (
            sample_info_or_path
            if isinstance(sample_info_or_path, SampleInfo)
            else load_sample_info(sample_info_or_path)
        )
        self.info = info
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer or info.tokenizer)
        want = info.fingerprint_inputs.get("tokenizer_sha256")
        if want is not None and file_sha256(tok.path) != want:
            raise ValueError(
                f"tokenizer {tok.path} is not the one sample info {info.path} was built with "
                f"({info.tokenizer}); pass that tokenizer or rerun tools/preprocess_lengths.py"
            )
        self._tokenizer = tok
        self._template = CompiledTemplate(info.template, tok)
        self._lengths = np.asarray(info.lengths)
        self._loss = np.asarray(info.loss_tokens)
        self._check_files()
        if cache_dir is None:
            cache_dir = Path(info.path).parent / ".decompressed" if info.path else Path("cache/decompressed")
        self._paths = [self._readable_path(f, Path(cache_dir)) for f in info.files]
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def _check_files(self) -> None:
        for entry in self.info.fingerprint_inputs.get("files", []):
            p = entry["path"]
            if not os.path.exists(p):
                raise FileNotFoundError(f"data file {p} of sample info {self.info.path} no longer exists")
            st = os.stat(p)
            if st.st_size != entry["size"] or ("mtime_ns" in entry and st.st_mtime_ns != entry["mtime_ns"]):
                log.warning(
                    "data file %s changed since sample info %s was built; lines are checked one by one "
                    "(rerun tools/preprocess_lengths.py to refresh)",
                    p,
                    self.info.path,
                )

    @staticmethod
    def _readable_path(path: str, cache_dir: Path) -> str:
        if not is_gzip_path(path):
            return path
        st = os.stat(path)
        key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[
            :16
        ]
        copy = cache_dir / f"{Path(path).name[: -len('.gz')]}.{key}"
        if not copy.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            log.info("decompressing %s to %s for random access (once)", path, copy)
            fd, tmp = tempfile.mkstemp(prefix=copy.name + ".", suffix=".tmp", dir=cache_dir)
            try:
                with os.fdopen(fd, "wb") as out:
                    cut = decompress_file(path, out)
                if cut:  # preprocessing kept only the complete lines before the damage (CRC-checked)
                    log.warning("%s: %s; only the lines before the damage are readable", path, cut)
                os.replace(tmp, copy)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return str(copy)

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _file(self, source: int):
        if self._pid != os.getpid():  # forked: never share the parent's file positions
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(source)
        if f is None:
            f = self._handles[source] = open(self._paths[source], "rb")  # noqa: SIM115 - kept open across calls, closed by close()
        return f

    def close(self) -> None:
        """Close the file handles of this process."""
        for f in self._handles.values():
            f.close()
        self._handles = {}

    def where(self, i: int) -> str:
        """``file:line`` of sample ``i``."""
        return f"{self.info.files[int(self.info.source[i])]}:{int(self.info.line[i])}"

    def read_line(self, i: int) -> bytes:
        """The raw bytes of sample ``i``'s line (without the newline), CRC-checked."""
        f = self._file(int(self.info.source[i]))
        f.seek(int(self.info.offset[i]))
        raw = f.readline()
        if raw.endswith(b"\n"):
            raw = raw[:-1]
        if zlib.crc32(raw) != int(self.info.crc32[i]):
            raise DataChangedError(
                f"{self.where(i)}: the line at byte {int(self.info.offset[i])} differs from the one preprocessed "
                "(the file changed); rerun tools/preprocess_lengths.py"
            )
        return raw

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        raw = self.read_line(i)
        try:
            conv = parse_line(raw)
        except LineError as e:  # pragma: no cover - excluded by the CRC check unless the CRC collides
            raise DataChangedError(f"{self.where(i)}: {e}") from None
        ids, mask = self._template.encode(conv)
        max_len = self.info.max_length
        if max_len is not None and ids.shape[0] > max_len:
            ids, mask = ids[:max_len], mask[:max_len]
        if ids.shape[0] != self._lengths[i] or int(mask.sum()) != self._loss[i]:
            raise DataChangedError(
                f"{self.where(i)}: tokenised to {ids.shape[0]} tokens / {int(mask.sum())} loss tokens, sample info "
                f"says {int(self._lengths[i])} / {int(self._loss[i])} (tokenizer or template changed?); "
                "rerun tools/preprocess_lengths.py"
            )
        return Sample(i, ids, mask)
