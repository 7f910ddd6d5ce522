"""Token files: the token ids and loss mask of every kept sample, in Megatron-Core's IndexedDataset format.

Beside a sample-info file ``NAME.npz`` preprocessing writes (see docs/data.md)::

    NAME.tokens.bin / NAME.tokens.idx        token ids, one sequence per sample (smallest dtype
                                             that holds the vocabulary: uint8, uint16 or int32)
    NAME.loss_mask.bin / NAME.loss_mask.idx  loss mask, uint8 0/1, one sequence per sample
    NAME.tokens.json                         fingerprint (the sample info's), counts, dtypes,
                                             SHA-256 of both .idx files

Both pairs are plain Megatron-Core IndexedDatasets (``MMIDIDX`` index version 1, one sequence
per document, no modes): ``megatron.core.datasets.indexed_dataset.IndexedDataset(prefix)``
reads them. This module writes and reads the format with NumPy only (no torch, no Megatron).

``.idx`` layout (little endian): ``b"MMIDIDX\\x00\\x00"``, ``u64`` version 1, ``u8`` dtype code
(1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), ``u64`` sequence
count N, ``u64`` document count D (= N + 1 here), ``int32[N]`` sequence lengths, ``int64[N]``
byte offsets of the sequences in the ``.bin``, ``int64[D]`` document indices (0, 1, ..., N).
The ``.bin`` is the sequences back to back.

Every file is written to a temporary name and renamed into place; the ``.json`` is renamed
last and the sample info after it, so a run that dies leaves either the old complete set or
files whose fingerprint does not match (rebuilt on the next run, refused by the trainer).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_hbp.data.dataset import DataChangedError, Sample, SFTDataset
from megatron_hbp.data.sample_info import SampleInfo, load_sample_info
from megatron_hbp.data.tokenizer import file_sha256

__all__ = [
    "TOKEN_FORMAT",
    "TokenFileError",
    "TokenPaths",
    "TokenWriter",
    "TokenDataset",
    "token_paths",
    "token_dtype",
    "write_idx",
    "read_idx",
    "check_token_files",
    "remove_token_files",
    "stale_reason",
    "open_sft_dataset",
    "chunk_tokens",
    "read_indexed",
]

TOKEN_FORMAT = "megatron-hbp token files 1"
IDX_HEADER = b"MMIDIDX\x00\x00"
_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_DTYPES = {v: k for k, v in _CODES.items()}
_HEAD = len(IDX_HEADER) + 8 + 1 + 8 + 8  # 34 bytes


class TokenFileError(ValueError):
    """A token file is missing, damaged or does not belong to its sample info (message names it)."""


@dataclass(frozen=True)
class TokenPaths:
    """The token files of one sample-info file."""

    tokens: str
    """IndexedDataset prefix of the token ids (``.bin``/``.idx``)."""
    loss_mask: str
    """IndexedDataset prefix of the loss mask."""
    meta: str
    """The ``.json`` with the fingerprint."""

    def files(self) -> list[str]:
        return [
            self.tokens + ".bin",
            self.tokens + ".idx",
            self.loss_mask + ".bin",
            self.loss_mask + ".idx",
            self.meta,
        ]


def token_paths(sample_info_path: str | os.PathLike) -> TokenPaths:
    """Token file names beside ``sample_info_path`` (``NAME.npz`` -> ``NAME.tokens.*``, ...)."""
    p = Path(sample_info_path)
    base = str(p.with_suffix("")) if p.suffix == ".npz" else str(p)
    return TokenPaths(base + ".tokens", base + ".loss_mask", base + ".tokens.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest IndexedDataset dtype that holds ids ``0 .. vocab_size-1``: uint8, uint16 or int32."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit Megatron's int32 token files")


def write_idx(f, lengths: np.ndarray, dtype) -> None:
    """Write a Megatron-Core ``.idx`` (one sequence per document) for sequences of ``lengths``
    elements of ``dtype`` to the binary file ``f``."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, np.int64)
    n = int(lengths.size)
    pointers = np.zeros(n, np.int64)
    if n:
        pointers[1:] = np.cumsum(lengths[:-1]) * dtype.itemsize
    f.write(IDX_HEADER)
    f.write(struct.pack("<Q", 1))
    f.write(struct.pack("<B", _CODES[dtype]))
    f.write(struct.pack("<Q", n))
    f.write(struct.pack("<Q", n + 1))
    f.write(lengths.astype("<i4").tobytes())
    f.write(pointers.astype("<i8").tobytes())
    f.write(np.arange(n + 1, dtype="<i8").tobytes())


@dataclass
class IdxInfo:
    """What an ``.idx`` holds: element ``dtype``, ``lengths`` int32 [N], ``pointers`` int64 [N]."""

    path: str
    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray | None = None
    """int64 [D]: the first sequence of each document, then the sequence count."""

    @property
    def bin_bytes(self) -> int:
        """Bytes the matching ``.bin`` must have."""
        return int(self.lengths.astype(np.int64).sum()) * self.dtype.itemsize


def read_idx(path: str | os.PathLike) -> IdxInfo:
    """Read a Megatron-Core ``.idx``; :class:`TokenFileError` naming the file when it is not one
    (missing, bad header or version, unknown dtype, cut short, pointers that do not follow the
    lengths)."""
    path = str(path)
    if not os.path.isfile(path):
        raise TokenFileError(f"index file {path} does not exist")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    raw = bytes(buf[:_HEAD])
    if len(raw) < _HEAD or raw[: len(IDX_HEADER)] != IDX_HEADER:
        raise TokenFileError(f"{path} is not a Megatron IndexedDataset index (no MMIDIDX header)")
    version, code, n, d = struct.unpack("<QBQQ", raw[len(IDX_HEADER) :])
    if version != 1 or code not in _DTYPES:
        raise TokenFileError(
            f"{path}: unsupported IndexedDataset index (version {version}, dtype code {code})"
        )
    need = _HEAD + 4 * n + 8 * n + 8 * d
    if buf.size < need:
        raise TokenFileError(f"{path} is cut short: {buf.size} bytes, its header announces {need}")
    lengths = np.frombuffer(buf, "<i4", n, _HEAD)
    pointers = np.frombuffer(buf, "<i8", n, _HEAD + 4 * n)
    dt = _DTYPES[code]
    if n:
        expect = np.zeros(n, np.int64)
        expect[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * dt.itemsize
        if (lengths < 0).any() or not np.array_equal(pointers, expect + pointers[0]) or pointers[0] != 0:
            raise TokenFileError(
                f"{path}: sequence pointers do not follow the lengths (not written contiguously)"
            )
    docs = np.frombuffer(buf, "<i8", d, _HEAD + 12 * n)
    return IdxInfo(path, dt, lengths, pointers, docs)


def chunk_tokens(
    piece_items: list, encoded: list, piece_len: np.ndarray, piece_mask: np.ndarray, piece_sample: np.ndarray,
    lengths: np.ndarray, keep: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Token ids (int64) and loss mask (uint8) of the kept samples of one preprocessing chunk,
    back to back, each sample cut to its final length.

    ``piece_items``: every template piece of the chunk in order, a token id (``int``) or a text
    (``str``); ``encoded``: the token ids of the texts, in order; ``piece_len`` / ``piece_mask`` /
    ``piece_sample``: per piece its token count, mask bit and sample; ``lengths`` / ``keep``: per
    sample its final (possibly truncated) length and whether it is kept.
    """
    flat: list[int] = []
    texts = iter(encoded)
    for x in piece_items:
        if isinstance(x, str):
            flat.extend(next(texts))
        else:
            flat.append(x)
    ids = np.asarray(flat, np.int64)
    mask = np.repeat(np.asarray(piece_mask, np.uint8), piece_len)
    n = int(lengths.shape[0])
    full = np.bincount(piece_sample, weights=piece_len, minlength=n).astype(np.int64)
    starts = np.zeros(n, np.int64)
    if n:
        starts[1:] = np.cumsum(full[:-1])
    sel = np.flatnonzero(keep)
    if not sel.size:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    # positions of the first lengths[k] tokens of each kept sample k
    take = np.repeat(starts[sel], lengths[sel]) + (
        np.arange(int(lengths[sel].sum())) - np.repeat(np.cumsum(lengths[sel]) - lengths[sel], lengths[sel])
    )
    return ids[take], mask[take]


def _tmp(path: str) -> tuple[object, str]:
    d, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=name + ".", suffix=".tmp", dir=d or ".")
    return os.fdopen(fd, "wb"), tmp


class TokenWriter:
    """Streams the token ids and loss mask of each chunk to temporary ``.bin`` files beside
    ``sample_info_path``; :meth:`finish` writes the ``.idx`` files and the ``.json`` and renames
    everything into place, :meth:`abort` removes the temporaries."""

    def __init__(self, sample_info_path: str | os.PathLike, vocab_size: int):
        self.paths = token_paths(sample_info_path)
        Path(self.paths.meta).parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self._tmps: list[str] = []
        self._tok, t = _tmp(self.paths.tokens + ".bin")
        self._tmps.append(t)
        self._mask, t = _tmp(self.paths.loss_mask + ".bin")
        self._tmps.append(t)
        self.tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"token id {int(ids.max())} is outside the tokenizer's vocabulary of {self.vocab_size}"
            )
        self._tok.write(ids.astype(self.dtype.newbyteorder("<")).tobytes())
        self._mask.write(np.asarray(mask, np.uint8).tobytes())
        self.tokens += int(ids.size)

    def finish(self, lengths: np.ndarray, fingerprint: str) -> dict:
        """Write the indexes and the ``.json``, rename all into place; returns the bytes on disk
        per file kind (``token_bin``, ``token_idx``, ``loss_mask_bin``, ``loss_mask_idx``)."""
        lengths = np.asarray(lengths, np.int64)
        if int(lengths.sum()) != self.tokens:
            raise RuntimeError(
                f"token files: {self.tokens} tokens written but the lengths sum to {lengths.sum()}"
            )
        self._tok.close()
        self._mask.close()
        sizes = {}
        finals = [self.paths.tokens + ".bin", self.paths.loss_mask + ".bin"]
        meta = {
            "format": TOKEN_FORMAT,
            "fingerprint": fingerprint,
            "samples": int(lengths.size),
            "tokens": self.tokens,
            "vocab_size": self.vocab_size,
            "token_dtype": self.dtype.name,
            "loss_mask_dtype": "uint8",
        }
        for prefix, dt, key in (
            (self.paths.tokens, self.dtype, "token"),
            (self.paths.loss_mask, np.uint8, "loss_mask"),
        ):
            f, t = _tmp(prefix + ".idx")
            self._tmps.append(t)
            with f:
                write_idx(f, lengths, dt)
            finals.append(prefix + ".idx")
            meta[f"{key}_idx_sha256"] = file_sha256(t)
        for t, final in zip(self._tmps, finals):
            os.chmod(t, 0o644)
            os.replace(t, final)
        self._tmps = []
        f, t = _tmp(self.paths.meta)
        with f:
            f.write(json.dumps(meta, indent=1, sort_keys=True).encode())
        os.chmod(t, 0o644)
        os.replace(t, self.paths.meta)
        for prefix, key in ((self.paths.tokens, "token"), (self.paths.loss_mask, "loss_mask")):
            sizes[f"{key}_bin"] = os.path.getsize(prefix + ".bin")
            sizes[f"{key}_idx"] = os.path.getsize(prefix + ".idx")
        return sizes

    def abort(self) -> None:
        for f in (self._tok, self._mask):
            f.close()
        for t in self._tmps:
            Path(t).unlink(missing_ok=True)
        self._tmps = []


def remove_token_files(sample_info_path: str | os.PathLike) -> None:
    """Delete the token files of ``sample_info_path`` (a lengths-only rebuild makes them stale)."""
    for f in token_paths(sample_info_path).files():
        Path(f).unlink(missing_ok=True)


def stale_reason(info: SampleInfo) -> str | None:
    """Why the token files of ``info`` must be (re)written (missing, or do not match), else ``None``."""
    try:
        paths = check_token_files(info)
    except TokenFileError as e:
        return f"token files do not match: {e}"
    return "token files missing" if paths is None else None


def _where(info: SampleInfo) -> str:
    return info.path or "the sample info"


def check_token_files(info: SampleInfo, *, hash_idx: bool = True) -> TokenPaths | None:
    """The token files of ``info`` when they exist and match it, ``None`` when there are none.

    :class:`TokenFileError` (one line, naming the file and the fix) when they exist but do not
    match: ``.json`` missing or unreadable, another fingerprint (other data, tokenizer, template or
    length limit), an ``.idx`` with another sample count or other lengths (another dataset) or
    that is not the one written with the ``.json``, a ``.bin`` of the wrong size (truncated)."""
    if not info.path:
        return None
    paths = token_paths(info.path)
    fix = f"rerun tools/preprocess_lengths.py for {info.path} (or delete {paths.meta} and the .bin/.idx files to train from the JSONL)"
    present = [f for f in paths.files() if os.path.exists(f)]
    if not present:
        return None
    if not os.path.exists(paths.meta):
        raise TokenFileError(f"token files {present[0]} exist but {paths.meta} is missing; {fix}")
    try:
        meta = json.loads(Path(paths.meta).read_text())
        ok = isinstance(meta, dict) and meta.get("format") == TOKEN_FORMAT
    except (OSError, ValueError) as e:
        raise TokenFileError(f"{paths.meta} is unreadable ({e}); {fix}") from None
    if not ok:
        raise TokenFileError(f"{paths.meta} is not a '{TOKEN_FORMAT}' file; {fix}")
    if meta.get("fingerprint") != info.fingerprint:
        raise TokenFileError(
            f"{paths.meta}: token files were written for fingerprint {str(meta.get('fingerprint'))[:12]}, sample "
            f"info {_where(info)} has {info.fingerprint[:12]} (other data, tokenizer, template or max_length); {fix}"
        )
    lengths = np.asarray(info.lengths)
    for prefix, key, dt in (
        (paths.tokens, "token", meta.get("token_dtype")),
        (paths.loss_mask, "loss_mask", "uint8"),
    ):
        try:
            idx = read_idx(prefix + ".idx")
        except TokenFileError as e:
            raise TokenFileError(f"{e}; {fix}") from None
        if idx.dtype.name != dt:
            raise TokenFileError(f"{idx.path} holds {idx.dtype.name}, {paths.meta} says {dt}; {fix}")
        if idx.lengths.size != lengths.size:
            raise TokenFileError(
                f"{idx.path} holds {idx.lengths.size} samples, sample info {_where(info)} has {lengths.size} "
                f"(an index of another dataset?); {fix}"
            )
        bad = np.flatnonzero(idx.lengths != lengths)
        if bad.size:
            i = int(bad[0])
            raise TokenFileError(
                f"{idx.path}: sample {i} has {int(idx.lengths[i])} tokens, sample info {_where(info)} says "
                f"{int(lengths[i])} ({bad.size} samples differ: an index of another dataset?); {fix}"
            )
        if hash_idx and file_sha256(idx.path) != meta.get(f"{key}_idx_sha256"):
            raise TokenFileError(f"{idx.path} is not the index written with {paths.meta} (replaced?); {fix}")
        bin_path = prefix + ".bin"
        if not os.path.isfile(bin_path):
            raise TokenFileError(f"token file {bin_path} does not exist; {fix}")
        size = os.path.getsize(bin_path)
        if size != idx.bin_bytes:
            raise TokenFileError(
                f"{bin_path} has {size} bytes, its index needs {idx.bin_bytes} "
                f"({'truncated' if size < idx.bin_bytes else 'extra bytes'}); {fix}"
            )
    return paths


def _prefix(spec: str | os.PathLike) -> str:
    p = str(spec)
    return p[:-4] if p.endswith((".idx", ".bin")) else p


def read_indexed(
    prefix: str | os.PathLike, loss_mask: str | os.PathLike | None = None, *, block: int = 1 << 24
) -> tuple[np.ndarray, np.ndarray]:
    """Per-document ``(lengths, loss_tokens)`` (int64) of an existing Megatron IndexedDataset
    ``prefix`` (``.idx``/``.bin``; a trailing ``.idx``/``.bin`` is ignored), for planning.

    A document is one sample: its length is the sum of its sequences' lengths (one sequence per
    document unless the data was split into sentences). Every token is a loss token, unless
    ``loss_mask`` names a second IndexedDataset with the same sequence lengths whose nonzero
    elements mark the loss tokens (its ``.bin`` is read once, ``block`` elements at a time).
    :class:`TokenFileError` naming the file when a prefix does not exist or does not fit.
    """
    prefix = _prefix(prefix)
    hint = "pass the IndexedDataset prefix (PATH for PATH.idx + PATH.bin)"
    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise TokenFileError(f"IndexedDataset {prefix}: {prefix + ext} does not exist; {hint}")
    idx = read_idx(prefix + ".idx")
    size = os.path.getsize(prefix + ".bin")
    if size < idx.bin_bytes:
        raise TokenFileError(f"{prefix}.bin has {size} bytes, its index needs {idx.bin_bytes} (truncated)")
    seq = idx.lengths.astype(np.int64)
    docs = idx.document_indices
    if docs is None or docs.size < 1 or docs[0] != 0 or docs[-1] != seq.size or (np.diff(docs) < 0).any():
        raise TokenFileError(f"{idx.path}: document indices are not 0 .. {seq.size} in order")
    cum = np.concatenate([[0], np.cumsum(seq)])
    lengths = cum[docs[1:]] - cum[docs[:-1]]
    if loss_mask is None:
        return lengths, lengths.copy()
    mprefix = _prefix(loss_mask)
    for ext in (".idx", ".bin"):
        if not os.path.isfile(mprefix + ext):
            raise TokenFileError(
                f"loss-mask IndexedDataset {mprefix}: {mprefix + ext} does not exist; {hint}"
            )
    midx = read_idx(mprefix + ".idx")
    if midx.lengths.size != seq.size or not np.array_equal(midx.lengths, idx.lengths):
        raise TokenFileError(
            f"loss mask {midx.path} has {midx.lengths.size} sequences of other lengths than the "
            f"{seq.size} of {idx.path}; pass the loss mask written with these tokens"
        )
    msize = os.path.getsize(mprefix + ".bin")
    if msize < midx.bin_bytes:
        raise TokenFileError(f"{mprefix}.bin has {msize} bytes, its index needs {midx.bin_bytes} (truncated)")
    total = int(cum[-1])
    # loss tokens per document = differences of the running count of nonzero mask elements at
    # the document boundaries; counted block by block so memory stays bounded
    bounds = cum[docs]
    out = np.zeros(bounds.size, np.int64)
    mm = (
        np.memmap(mprefix + ".bin", dtype=midx.dtype.newbyteorder("<"), mode="r", shape=(total,))
        if total
        else None
    )
    running = 0
    j = 0  # next boundary to fill
    for a in range(0, total, block):
        b = min(a + block, total)
        c = np.cumsum(np.asarray(mm[a:b]) != 0, dtype=np.int64)
        k = int(np.searchsorted(bounds, b, side="right"))
        sel = bounds[j:k]
        out[j:k] = running + np.where(sel > a, c[np.maximum(sel - a - 1, 0)], 0)
        running += int(c[-1])
        j = k
    out[j:] = running
    return lengths, np.diff(out)


class TokenDataset:
    """Samples of a sample-info file read from its token files by mmap (no tokenizer).

    Same interface as :class:`~megatron_hbp.data.dataset.SFTDataset`: ``ds[i]`` is a
    :class:`Sample` (``input_ids`` int32, ``loss_mask`` uint8). The files are checked with
    :func:`check_token_files` on construction (``TokenFileError`` when they do not match); each
    sample's loss-token count is checked against the sample info on access. The memory maps are
    opened lazily in each process and dropped when pickled (cheap to send to DataLoader workers).
    """

    def __init__(self, sample_info_or_path: SampleInfo | str | os.PathLike, *, check: bool = True):
        info = (
            sample_info_or_path
            if isinstance(sample_info_or_path, SampleInfo)
            else load_sample_info(sample_info_or_path)
        )
        self.info = info
        paths = check_token_files(info) if check else token_paths(info.path)
        if paths is None:
            raise TokenFileError(
                f"sample info {_where(info)} has no token files; rerun tools/preprocess_lengths.py"
            )
        self.paths = paths
        tok = read_idx(paths.tokens + ".idx")
        self._dtype = tok.dtype
        self._start = np.concatenate([[0], np.cumsum(np.asarray(info.lengths, np.int64))])
        self._loss = np.asarray(info.loss_tokens)
        self._maps = None

    def __len__(self) -> int:
        return int(self._start.shape[0] - 1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _open(self):
        if self._maps is None:
            n = int(self._start[-1])
            if n == 0:
                self._maps = (np.zeros(0, self._dtype), np.zeros(0, np.uint8))
            else:
                self._maps = (
                    np.memmap(
                        self.paths.tokens + ".bin", dtype=self._dtype.newbyteorder("<"), mode="r", shape=(n,)
                    ),
                    np.memmap(self.paths.loss_mask + ".bin", dtype=np.uint8, mode="r", shape=(n,)),
                )
        return self._maps

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        ids_map, mask_map = self._open()
        a, b = int(self._start[i]), int(self._start[i + 1])
        ids = np.array(ids_map[a:b], dtype=np.int32)
        mask = np.array(mask_map[a:b], dtype=np.uint8)
        if int(mask.sum()) != int(self._loss[i]):
            raise DataChangedError(
                f"{self.paths.loss_mask}.bin: sample {i} has {int(mask.sum())} loss tokens, sample info says "
                f"{int(self._loss[i])} (the file changed); rerun tools/preprocess_lengths.py"
            )
        return Sample(i, ids, mask)

    def close(self) -> None:
        self._maps = None


def open_sft_dataset(sample_info_or_path: SampleInfo | str | os.PathLike):
    """:class:`TokenDataset` when the sample info has token files (checked: ``TokenFileError``
    when they do not match), else the JSONL :class:`SFTDataset` (tokenises on access)."""
    info = (
        sample_info_or_path
        if isinstance(sample_info_or_path, SampleInfo)
        else load_sample_info(sample_info_or_path)
    )
    if check_token_files(info) is not None:
        return TokenDataset(info, check=False)
    return SFTDataset(info)
