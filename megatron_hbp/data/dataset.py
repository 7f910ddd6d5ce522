"""Random-access SFT samples: read one line by its stored byte offset and tokenise it.

``SFTDataset(sample_info)[i]`` seeks to ``offset[i]`` in ``files[source[i]]``, reads that one
line, checks its CRC32 against the one recorded at preprocessing time, applies the same
template and truncation, and checks the token count against ``lengths[i]``. Any mismatch
raises :class:`DataChangedError` naming the file and line, so a changed file can never be
read silently at the wrong place.

Gzipped files (``.jsonl.gz``): gzip has no random access, so the offsets stored by
preprocessing refer to the decompressed stream, and the dataset decompresses each ``.gz`` file
once per process into an *unnamed* temporary file (``tempfile.TemporaryFile``: ``O_TMPFILE`` or
unlinked at once) in ``tmp_dir`` (default: the sample-info file's folder) and reads lines from
it with ``os.pread``. The copy has no name on disk: the kernel frees it when the process ends,
however it ends (normal exit, exception, SIGTERM pre-emption, even SIGKILL), so no copy is ever
left behind; forked DataLoader workers share the parent's copy. Its size is printed when it is
made. Seeking in it is O(1); the per-line CRC check catches a wrong copy. The token files
(preprocessing's default) need no copy at all.

File handles are opened lazily in each process (after a fork, a worker reopens its own), and
pickling drops them: the dataset is cheap to send to DataLoader workers.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
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


def _pread_line(fd: int, offset: int, block: int = 1 << 14) -> bytes:
    """The line starting at byte ``offset`` of descriptor ``fd``, with its newline if any."""
    parts = []
    while chunk := os.pread(fd, block, offset):
        j = chunk.find(b"\n")
        if j >= 0:
            parts.append(chunk[: j + 1])
            break
        parts.append(chunk)
        offset += len(chunk)
        block = min(block * 2, 1 << 22)
    return b"".join(parts)


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
    have the same file contents (SHA-256), else ``ValueError``. ``tmp_dir``: the folder of the
    unnamed temporary copies of ``.gz`` files (default: the sample info's folder, else the
    system's temporary folder); nothing named is ever written there.
    """

    def __init__(
        self,
        sample_info_or_path: SampleInfo | str | os.PathLike,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        *,
        tmp_dir: str | os.PathLike | None = None,
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
        if tmp_dir is None:
            tmp_dir = Path(info.path).parent if info.path else Path(tempfile.gettempdir())
        self._tmp_dir = Path(tmp_dir)
        self._handles: dict[int, object] = {}
        self._copies: dict[int, object] = {}  # source -> unnamed decompressed copy of a .gz file
        self._pid = os.getpid()
        for source, f in enumerate(info.files):
            if is_gzip_path(f):
                self._copy(source)

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

    def _copy(self, source: int):
        """The unnamed decompressed copy of ``.gz`` file ``source`` (made on first use in this
        process; a forked child inherits its parent's)."""
        f = self._copies.get(source)
        if f is not None:
            return f
        path = self.info.files[source]
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # TemporaryFile: no name on disk (O_TMPFILE, or unlinked at once), freed when the last
        # descriptor closes, i.e. at the latest when the process (and its forked workers) ends.
        f = tempfile.TemporaryFile(dir=self._tmp_dir)  # noqa: SIM115 - lives as long as the dataset
        try:
            cut = decompress_file(path, f)
            f.flush()
        except BaseException:
            f.close()
            raise
        if cut:  # preprocessing kept only the complete lines before the damage (CRC-checked)
            log.warning("%s: %s; only the lines before the damage are readable", path, cut)
        size = os.fstat(f.fileno()).st_size
        print(
            f"[hbp] decompressed {path} for random access: {size / 2**20:.1f} MiB in an unnamed temporary "
            f"file in {self._tmp_dir} (freed when this process ends), {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        self._copies[source] = f
        return f

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_copies"] = {}  # descriptors do not cross a pickle: a spawned child makes its own copy
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _file(self, source: int):
        if self._pid != os.getpid():  # forked: never share the parent's file positions
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(source)
        if f is None:
            f = self._handles[source] = open(self.info.files[source], "rb")  # noqa: SIM115 - kept open across calls, closed by close()
        return f

    def close(self) -> None:
        """Close the file handles of this process and free its decompressed copies (a later
        access makes them again)."""
        for f in [*self._handles.values(), *self._copies.values()]:
            f.close()
        self._handles, self._copies = {}, {}

    def where(self, i: int) -> str:
        """``file:line`` of sample ``i``."""
        return f"{self.info.files[int(self.info.source[i])]}:{int(self.info.line[i])}"

    def read_line(self, i: int) -> bytes:
        """The raw bytes of sample ``i``'s line (without the newline), CRC-checked."""
        source, offset = int(self.info.source[i]), int(self.info.offset[i])
        if is_gzip_path(self.info.files[source]):
            # pread: no shared file position, so forked workers can read the parent's copy at once
            raw = _pread_line(self._copy(source).fileno(), offset)
        else:
            f = self._file(source)
            f.seek(offset)
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
