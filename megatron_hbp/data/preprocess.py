"""Build sample info (token counts per sample) from chat JSONL, in parallel, with a cache.

Pipeline: the parent process reads each file sequentially (decompressing ``.gz``) and cuts it
into ~1 MiB chunks of whole lines; worker processes (a ``ProcessPoolExecutor``, results in
order, at most ``4 * workers`` chunks in flight; a dead worker ends the run with
:class:`WorkerError`, never a hang) parse each line, render it with the chat template, encode **all text pieces of the
chunk in one tokenizer call** and reduce piece lengths to per-sample counts with NumPy; the
parent concatenates the per-chunk arrays. With ``workers=1`` everything runs in-process.

Per-sample token counts are exactly what :class:`~megatron_hbp.data.dataset.SFTDataset`
produces for the same sample (same template code, same truncation rule).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_hbp.data import token_files
from megatron_hbp.data.formats import Chunk, DataError, LineError, iter_chunks, parse_line, resolve_data_paths
from megatron_hbp.data.sample_info import (
    SKIPPED_DTYPE,
    SampleInfo,
    describe_changes,
    fingerprint_inputs,
    fingerprint_of,
    load_sample_info,
    save_sample_info,
)
from megatron_hbp.data.templates import CompiledTemplate, get_template
from megatron_hbp.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["preprocess", "PreprocessResult", "WorkerError", "ON_ERROR", "OVERFLOW", "truncated_loss_tokens"]

log = logging.getLogger("megatron_hbp.data")

ON_ERROR = ("raise", "skip")
OVERFLOW = ("truncate", "drop")


@dataclass
class PreprocessResult:
    """``info``: the sample info (saved at ``info.path``); ``reused``: the cached file matched the
    inputs and nothing was recomputed; ``changes``: why an existing file was not reused;
    ``seconds``: wall time of the computation (0 when reused)."""

    info: SampleInfo
    reused: bool
    changes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _ChunkResult:
    source: int
    raw_pos: int
    lengths: np.ndarray  # int64 [n]
    loss_tokens: np.ndarray  # int64 [n]
    offset: np.ndarray  # int64 [n]
    line: np.ndarray  # int64 [n]
    crc32: np.ndarray  # uint32 [n]
    truncated: np.ndarray  # bool [n]
    errors: list  # [(line, kind-prefixed reason)] bad input
    dropped: list  # [(line, reason)] over-long samples dropped
    blank: int
    tokens: tuple | None = None  # (ids int64, loss mask uint8) of the kept samples (token files)


def truncated_loss_tokens(piece_lens: np.ndarray, piece_mask: np.ndarray, max_length: int) -> int:
    """Loss tokens among the first ``max_length`` tokens of a sample given its pieces'
    token counts ``[P]`` and mask bits ``[P]``."""
    ends = np.cumsum(piece_lens)
    kept = np.clip(max_length - (ends - piece_lens), 0, piece_lens)
    return int((kept * piece_mask).sum())


def _error_kind(message: str) -> str:
    for key, kind in (
        ("invalid UTF-8", "invalid_utf8"),
        ("malformed JSON", "malformed_json"),
        ("neither", "missing_messages_key"),
        ("unknown role", "unknown_role"),
        ("empty conversation", "empty_conversation"),
        ("no assistant turn", "no_assistant_turn"),
        ("empty response", "empty_response"),
    ):
        if key in message:
            return kind
    return "invalid_conversation"


def _process_chunk(
    chunk: Chunk,
    compiled: CompiledTemplate,
    max_length: int | None,
    truncate: bool,
    with_tokens: bool = False,
) -> _ChunkResult:
    lines = chunk.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the chunk ends with a newline
    starts = np.zeros(len(lines), np.int64)
    if lines:
        starts[1:] = np.cumsum(np.fromiter((len(x) + 1 for x in lines[:-1]), np.int64, len(lines) - 1))
    starts += chunk.offset

    texts: list[str] = []
    text_pos: list[int] = []
    piece_len: list[int] = []
    piece_mask: list[int] = []
    piece_sample: list[int] = []
    piece_items: list = []  # token id or text of every piece (token files)
    kept: list[int] = []
    crcs: list[int] = []
    errors = []
    blank = 0
    for i, raw in enumerate(lines):
        try:
            conv = parse_line(raw)
        except LineError as e:
            msg = str(e)
            errors.append((chunk.line + i, f"{_error_kind(msg)}: {msg}"))
            continue
        if conv is None:
            blank += 1
            continue
        k = len(kept)
        kept.append(i)
        crcs.append(zlib.crc32(raw))
        items, masks = compiled.render(conv)
        for x, m in zip(items, masks):
            if isinstance(x, str):
                text_pos.append(len(piece_len))
                texts.append(x)
            piece_items.append(x)
            piece_len.append(1)
            piece_mask.append(m)
            piece_sample.append(k)

    plen = np.asarray(piece_len, np.int64)
    encoded = []
    if texts:
        encoded = compiled.tokenizer.encode_batch(texts)
        plen[np.asarray(text_pos, np.int64)] = np.fromiter(map(len, encoded), np.int64, len(encoded))
    pmask = np.asarray(piece_mask, np.int64)
    psample = np.asarray(piece_sample, np.int64)
    n = len(kept)
    lengths = np.bincount(psample, weights=plen, minlength=n).astype(np.int64)
    loss = np.bincount(psample, weights=plen * pmask, minlength=n).astype(np.int64)
    truncated = np.zeros(n, bool)
    keep = np.ones(n, bool)
    dropped = []
    kept_arr = np.asarray(kept, np.int64)
    if max_length is not None and n:
        first_piece = np.searchsorted(psample, np.arange(n + 1))
        for k in np.flatnonzero(lengths > max_length):
            line_no = chunk.line + int(kept_arr[k])
            if not truncate:
                keep[k] = False
                dropped.append((line_no, f"too_long: {lengths[k]} tokens > max_length {max_length}"))
                continue
            a, b = first_piece[k], first_piece[k + 1]
            new_loss = truncated_loss_tokens(plen[a:b], pmask[a:b], max_length)
            if new_loss == 0:
                keep[k] = False
                dropped.append(
                    (line_no, f"no_loss_after_truncation: no assistant token within max_length {max_length}")
                )
                continue
            lengths[k], loss[k], truncated[k] = max_length, new_loss, True
    tokens = (
        token_files.chunk_tokens(piece_items, encoded, plen, pmask, psample, lengths, keep)
        if with_tokens
        else None
    )
    return _ChunkResult(
        source=chunk.source,
        raw_pos=chunk.raw_pos,
        lengths=lengths[keep],
        loss_tokens=loss[keep],
        offset=starts[kept_arr][keep] if n else np.zeros(0, np.int64),
        line=(chunk.line + kept_arr)[keep] if n else np.zeros(0, np.int64),
        crc32=np.asarray(crcs, np.uint32)[keep],
        truncated=truncated[keep],
        errors=errors,
        dropped=dropped,
        blank=blank,
        tokens=tokens,
    )


_WORKER: tuple | None = None


def _init_worker(
    tokenizer_path: str, template: str, max_length: int | None, truncate: bool, with_tokens: bool = False
) -> None:
    global _WORKER
    # One thread per worker: --workers is the only parallelism (HF tokenizers would spawn threads).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = load_tokenizer(tokenizer_path)
    _WORKER = (CompiledTemplate(template, tok, log_fallback=False), max_length, truncate, with_tokens)


def _work(chunk: Chunk) -> _ChunkResult:
    return _process_chunk(chunk, *_WORKER)


class WorkerError(RuntimeError):
    """A preprocessing worker process died or failed outside the per-line checks."""


def _parallel(chunks, workers: int, initargs: tuple):
    """Results of ``_work`` over ``chunks`` in order, on ``workers`` processes.

    The file is read here, in the caller's thread (so a read error is raised here, never inside
    the pool), with at most ``4 * workers`` chunks in flight (memory stays bounded). A worker's
    exception is re-raised as is (every error class of the package pickles); a worker that dies
    (killed, out of memory, crashed) ends the run with :class:`WorkerError` instead of a hang.
    Closing the generator (or an exception) shuts the pool down without waiting for queued work.
    """
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=initargs)
    pending: deque = deque()
    read_error = None  # raised once the chunks read before it are delivered (errors stay in file order)
    try:
        it = iter(chunks)
        more = True
        while more or pending:
            try:
                while more and len(pending) < 4 * workers:
                    try:
                        c = next(it, None)
                    except DataError as e:
                        c, read_error = None, e
                    if c is None:
                        more = False
                    else:
                        pending.append(pool.submit(_work, c))
                result = pending.popleft().result() if pending else None
            except BrokenProcessPool as e:
                raise WorkerError(
                    "a preprocessing worker process died before finishing its chunk (killed? out of "
                    f"memory? the tokenizer failed to load?): {e}; rerun with fewer --workers or --workers 1 "
                    "to see the error"
                ) from None
            if result is not None:
                yield result
        if read_error is not None:
            raise read_error
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _progress_bar(total_bytes: int, enabled: bool | None):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="preprocess",
        # None: a bar only when stderr is a terminal (logs and CI stay clean).
        disable=not (enabled if enabled is not None else sys.stderr.isatty()),
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        smoothing=0.1,
    )


def preprocess(
    data,
    output: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    template: str = "plain",
    workers: int = 1,
    max_length: int | None = None,
    on_error: str = "raise",
    overflow: str = "truncate",
    content_hash: bool = False,
    force: bool = False,
    progress: bool | None = None,
    chunk_bytes: int = 1 << 20,
    tokens: bool = True,
) -> PreprocessResult:
    """Compute and save the sample info of ``data`` (files, directories or globs) to ``output``.

    Reuses ``output`` when its fingerprint matches the current inputs (``force`` recomputes).
    ``on_error="raise"`` stops at the first bad line with a :class:`DataError` (file, line,
    problem) and writes nothing; ``"skip"`` records it in ``info.skipped``. Samples longer than
    ``max_length`` tokens are truncated (``overflow="truncate"``; a sample left without loss
    tokens is dropped) or dropped (``"drop"``); both are counted in ``info.stats``. A truncated
    or corrupt ``.gz`` file raises :class:`DataError` naming its last complete line, or with
    ``"skip"`` keeps every complete line before the damage and records the cut (kind
    ``truncated_file``, logged as a warning). A worker process that dies raises
    :class:`WorkerError`. ``progress``: ``None`` shows a bar only on a terminal. ``tokens``: also
    write the token ids and loss masks (:mod:`megatron_hbp.data.token_files`); ``False`` writes
    the sample info only (and removes stale token files).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    get_template(template)
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    files = resolve_data_paths(data)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    tok_path = str(Path(tok.path).resolve())
    output = Path(output)
    inputs = fingerprint_inputs(
        files, tok_path, template, max_length, overflow, on_error, content_hash=content_hash
    )
    fp = fingerprint_of(inputs)

    changes: list[str] = []
    if output.exists():
        try:
            old = load_sample_info(output)
        except (ValueError, OSError) as e:
            changes = [f"existing {output} is unreadable ({e})"]
        else:
            stale = token_files.stale_reason(old) if tokens else None
            if old.fingerprint == fp and not force and stale is None:
                return PreprocessResult(old, reused=True)
            changes = (
                ([stale] if stale else ["--force"])
                if old.fingerprint == fp
                else describe_changes(old.fingerprint_inputs, inputs)
            )

    truncate = overflow == "truncate"
    compiled = CompiledTemplate(template, tok)
    t0 = time.perf_counter()
    total_bytes = sum(f.stat().st_size for f in files)
    before = np.concatenate([[0], np.cumsum([f.stat().st_size for f in files])]).tolist()
    parts: list[_ChunkResult] = []
    cuts: list[tuple[int, int, str]] = []  # (source, first incomplete line, message): truncated .gz
    n_samples = 0
    writer = token_files.TokenWriter(output, tok.vocab_size) if tokens else None
    bar = _progress_bar(total_bytes, progress)
    try:
        chunks = iter_chunks(
            files, chunk_bytes, on_truncated=None if on_error == "raise" else lambda *c: cuts.append(c)
        )
        if workers == 1:
            results = (_process_chunk(c, compiled, max_length, truncate, tokens) for c in chunks)
        else:  # a generator: closed in ``finally``
            results = _parallel(chunks, workers, (tok_path, template, max_length, truncate, tokens))
        for r in results:
            if r.errors and on_error == "raise":
                line, reason = r.errors[0]
                raise DataError(files[r.source], line, reason.split(": ", 1)[1])
            if writer is not None:
                writer.add(*r.tokens)
                r.tokens = None
            parts.append(r)
            n_samples += len(r.lengths)
            bar.update(before[r.source] + r.raw_pos - bar.n)
            elapsed = time.perf_counter() - t0
            bar.set_postfix_str(
                f"{n_samples} samples, {n_samples / max(elapsed, 1e-9):.0f} samples/s", refresh=False
            )
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
        if workers > 1:
            results.close()  # shuts the pool down now, also when an error stopped the loop
    for source, line, msg in cuts:
        log.warning("%s:%d: %s; kept the complete lines before it", files[source], line, msg)
    seconds = time.perf_counter() - t0

    def cat(name, dtype):
        arrs = [getattr(p, name) for p in parts]
        return np.concatenate(arrs).astype(dtype) if arrs else np.zeros(0, dtype)

    lengths = cat("lengths", np.int64)
    if lengths.size and lengths.max() > np.iinfo(np.int32).max:
        raise ValueError("a sample has more than 2**31-1 tokens; pass --max-length")
    skipped = [(p.source, line, reason) for p in parts for line, reason in p.errors + p.dropped]
    skipped += [(source, line, f"truncated_file: {msg}") for source, line, msg in cuts]
    skipped.sort(key=lambda s: (s[0], s[1]))
    skipped_arr = np.array([(s, ln, r[:200]) for s, ln, r in skipped], dtype=SKIPPED_DTYPE)
    truncated = cat("truncated", bool)
    kinds = Counter(r.split(":", 1)[0] for p in parts for _, r in p.errors)
    kinds.update(["truncated_file"] * len(cuts))
    drops = Counter(r.split(":", 1)[0] for p in parts for _, r in p.dropped)
    stats = {
        "samples": int(lengths.size),
        "tokens": int(lengths.sum()),
        "loss_tokens": int(cat("loss_tokens", np.int64).sum()),
        "blank_lines": int(sum(p.blank for p in parts)),
        "skipped_bad_input": dict(sorted(kinds.items())),
        "dropped_too_long": int(drops.get("too_long", 0)),
        "dropped_no_loss_after_truncation": int(drops.get("no_loss_after_truncation", 0)),
        "truncated": int(truncated.sum()),
        "seconds": round(seconds, 3),
        "workers": workers,
        "input_bytes": int(total_bytes),
    }
    info = SampleInfo(
        lengths=lengths.astype(np.int32),
        loss_tokens=cat("loss_tokens", np.int32),
        source=np.concatenate([np.full(len(p.lengths), p.source, np.int32) for p in parts])
        if parts
        else np.zeros(0, np.int32),
        offset=cat("offset", np.int64),
        line=cat("line", np.int64),
        crc32=cat("crc32", np.uint32),
        truncated=truncated,
        files=[str(f) for f in files],
        fingerprint=fp,
        fingerprint_inputs=inputs,
        tokenizer=tok_path,
        template=template,
        max_length=max_length,
        truncate=truncate,
        skipped_array=skipped_arr,
        stats=stats,
        path=str(output),
    )
    if writer is not None:
        info.stats["disk_bytes"] = writer.finish(info.lengths, fp)
    else:
        token_files.remove_token_files(output)
    try:
        save_sample_info(info, output)
    except BaseException:
        token_files.remove_token_files(output)  # no sample info, no token files
        raise
    log.debug("wrote %s (%d samples) in %.2fs", output, len(info), seconds)
    return PreprocessResult(info, reused=False, changes=changes, seconds=seconds)


def stats_json(info: SampleInfo) -> str:
    """The run counters of ``info`` as indented JSON."""
    return json.dumps(info.stats, indent=2, sort_keys=True)
