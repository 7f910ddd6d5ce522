"""Chat JSONL readers: OpenAI ``messages`` and ShareGPT ``conversations`` lines, plain or gzipped.

A *conversation* is a ``list[tuple[str, str]]`` of ``(role, content)`` with role one of
``"system"``, ``"user"``, ``"assistant"``. Each JSONL line holds one conversation, in either format
(formats may be mixed line by line)::

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}

Blank lines are ignored (they still count for line numbers). Everything else that is not a
valid conversation raises :class:`LineError` with a message saying what is wrong; callers add
the file and line number (:class:`DataError`).

Byte offsets always refer to the *decompressed* stream (for ``.jsonl.gz`` too); line numbers
are 1-based.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LineError",
    "DataError",
    "Chunk",
    "parse_line",
    "resolve_data_paths",
    "open_binary",
    "iter_chunks",
    "is_gzip_path",
    "decompress_file",
]

ROLES = ("system", "user", "assistant")
# OpenAI "developer" is the newer name of "system".
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
}


_BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """One line is not a usable conversation (message says why; no file/line context)."""


class DataError(ValueError):
    """A data line is bad; names the file, the 1-based line number and the problem.

    Pickles (``__reduce__``), so that it crosses a process boundary intact (worker pools)."""

    def __init__(self, file: str, line: int, reason: str, skippable: bool = True, hint: str | None = None):
        self.file, self.line, self.reason, self.skippable, self.hint = (
            str(file),
            int(line),
            reason,
            skippable,
            hint,
        )
        if hint is None:
            hint = " (fix or remove the line, or pass --on-error skip to skip it)" if skippable else ""
        super().__init__(f"{self.file}:{self.line}: {reason}{hint}")

    def __reduce__(self):
        return (type(self), (self.file, self.line, self.reason, self.skippable, self.hint))


def _content(value, what: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}, ...]
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise LineError(
                    f"{what} has a non-text content part {str(p)[:60]!r} (only text is supported)"
                )
            texts.append(p["text"])
        return "".join(texts)
    raise LineError(f"{what} is {type(value).__name__}, expected a string")


def parse_line(raw: bytes) -> list[tuple[str, str]] | None:
    """Parse one JSONL line (bytes without the newline) into a conversation.

    Returns ``None`` for a blank line. Raises :class:`LineError` for: non-UTF-8 bytes, malformed
    JSON, a line that is not an object or has neither ``messages`` nor ``conversations``, a turn
    that is not an object or lacks its role/content field, an unknown role, non-text content,
    an empty conversation, a conversation without an assistant turn, or an assistant turn with
    empty (or whitespace-only) content (``empty response``). A UTF-8 byte-order mark at the start
    of the line is ignored.
    """
    if raw.startswith(_BOM):  # a UTF-8 byte-order mark (Windows editors write one on line 1)
        raw = raw[len(_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(
            f"invalid UTF-8 at byte {e.start} of the line ({raw[e.start : e.start + 4]!r})"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"malformed JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise LineError(
            f"line is a JSON {type(obj).__name__}, expected an object with 'messages' or 'conversations'"
        )
    if "messages" in obj:
        turns, key, role_key, content_key, roles = (
            obj["messages"],
            "messages",
            "role",
            "content",
            _OPENAI_ROLES,
        )
    elif "conversations" in obj:
        turns, key, role_key, content_key, roles = (
            obj["conversations"],
            "conversations",
            "from",
            "value",
            _SHAREGPT_ROLES,
        )
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise LineError(f"line has neither a 'messages' nor a 'conversations' key (keys: {keys})")
    if not isinstance(turns, list):
        raise LineError(f"'{key}' is {type(turns).__name__}, expected a list of turns")
    if not turns:
        raise LineError(f"empty conversation ('{key}' is an empty list)")
    conv = []
    has_assistant = False
    empty_response = None
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise LineError(f"{key}[{i}] is {type(turn).__name__}, expected an object")
        if role_key not in turn:
            raise LineError(f"{key}[{i}] has no '{role_key}' field")
        if content_key not in turn:
            raise LineError(f"{key}[{i}] has no '{content_key}' field")
        raw_role = turn[role_key]
        role = roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise LineError(f"{key}[{i}] has unknown role {raw_role!r} (expected one of {sorted(roles)})")
        has_assistant |= role == "assistant"
        content = _content(turn[content_key], f"{key}[{i}].{content_key}")
        if role == "assistant" and not content.strip() and empty_response is None:
            empty_response = i
        conv.append((role, content))
    if not has_assistant:
        raise LineError("conversation has no assistant turn (nothing to train on)")
    if empty_response is not None:
        raise LineError(
            f"empty response: {key}[{empty_response}] is an assistant turn with empty '{content_key}' "
            "(it would train the model to answer with nothing but the end token)"
        )
    return conv


def is_gzip_path(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gz")


def open_binary(path: str | os.PathLike):
    """Open a data file for binary reading, transparently decompressing ``*.gz``."""
    return gzip.open(path, "rb") if is_gzip_path(path) else open(path, "rb")


def resolve_data_paths(specs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, directories (every ``*.jsonl`` / ``*.jsonl.gz`` below, recursively) and glob
    patterns into a de-duplicated list of absolute file paths (sorted within each spec, so the
    order is reproducible). Raises ``FileNotFoundError`` naming the spec that matched nothing."""
    out: list[Path] = []
    seen = set()
    specs = list(specs)
    if not specs:
        raise FileNotFoundError("no data paths given (pass --data FILE|DIR|GLOB ...)")
    for spec in specs:
        s = os.fspath(spec)
        p = Path(s)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.name.endswith((".jsonl", ".jsonl.gz"))
            )
            if not found:
                raise FileNotFoundError(f"data directory {s} holds no *.jsonl or *.jsonl.gz files")
        elif p.is_file():
            found = [p]
        elif glob.has_magic(s):
            found = sorted(Path(q) for q in glob.glob(s, recursive=True) if Path(q).is_file())
            if not found:
                raise FileNotFoundError(f"data pattern {s!r} matched no files")
        else:
            raise FileNotFoundError(f"data file {s} does not exist")
        for q in found:
            q = q.resolve()
            if q not in seen:
                seen.add(q)
                out.append(q)
    return out


class _Cut(Exception):
    """The compressed stream ends early or is corrupt (message: what zlib said)."""


def _gzip_blocks(raw, size: int) -> Iterator[tuple[bytes, int]]:
    """Decompress the gzip stream ``raw`` (binary file) incrementally: yields ``(data, raw_pos)``
    with at most ``size`` decompressed bytes each, so that every byte before a cut or a corrupt
    block is delivered; then raises :class:`_Cut` if the stream is truncated or corrupt.
    Handles multi-member files (``cat a.gz b.gz``) and zero padding after the last member; the
    CRC-32 and length of each member are checked by zlib (at the member's end)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    fresh = True  # no byte of the current member consumed yet
    buf = b""
    while True:
        if not buf:
            buf = raw.read(min(size, 1 << 16))
            if not buf:
                if not fresh and not d.eof:
                    raise _Cut("the compressed data ends early (the file is truncated)")
                return
        if d.eof:  # another member follows
            if not buf.strip(b"\0"):
                buf = b""
                continue
            d, fresh = zlib.decompressobj(16 + zlib.MAX_WBITS), True
        saved = d.copy()
        try:
            out = d.decompress(buf, size)
        except zlib.error as e:
            # zlib returns nothing from a failing call: redo it byte by byte to keep every
            # byte decoded before the damage.
            good, d = bytearray(), saved
            try:
                for i in range(len(buf)):
                    good += d.decompress(buf[i : i + 1])
            except zlib.error:
                pass
            if good:
                yield bytes(good), raw.tell()
            raise _Cut(f"corrupt compressed data ({e})") from None
        fresh = False
        buf = d.unused_data if d.eof else d.unconsumed_tail
        if out:
            yield out, raw.tell() - len(buf)


def _plain_blocks(raw, size: int) -> Iterator[tuple[bytes, int]]:
    while block := raw.read(size):
        yield block, raw.tell()


def decompress_file(path: str | os.PathLike, out, block: int = 1 << 20) -> str | None:
    """Write the decompressed bytes of gzip file ``path`` to binary file ``out``. A truncated or
    corrupt file writes every byte before the damage and returns what is wrong (else ``None``)."""
    with open(path, "rb") as raw:
        try:
            for data, _ in _gzip_blocks(raw, block):
                out.write(data)
        except _Cut as e:
            return str(e)
    return None


@dataclass
class Chunk:
    """Complete lines of one file: ``data`` starts at decompressed byte ``offset`` and line
    ``line`` (1-based). ``raw_pos`` is the position in the (possibly compressed) file after
    reading it, for progress bars."""

    source: int
    offset: int
    line: int
    data: bytes
    raw_pos: int


def iter_chunks(
    paths: list[Path], chunk_bytes: int = 1 << 20, on_truncated: Callable[[int, int, str], None] | None = None
) -> Iterator[Chunk]:
    """Cut each file into chunks of about ``chunk_bytes`` bytes that end on line boundaries
    (a chunk holds at least one whole line, however long). Lines are never split.

    A truncated or corrupt ``.gz`` file: every complete line before the damage is yielded; then,
    with ``on_truncated=None``, :class:`DataError` names the file and its last complete line;
    otherwise ``on_truncated(source, first_incomplete_line, message)`` is called, the partial
    line at the cut is discarded and reading goes on with the next file."""
    for source, path in enumerate(paths):
        with open(path, "rb") as raw:
            blocks = _gzip_blocks(raw, chunk_bytes) if is_gzip_path(path) else _plain_blocks(raw, chunk_bytes)
            offset, line, carry = 0, 1, b""
            while True:
                try:
                    block, raw_pos = next(blocks, (b"", raw.tell()))
                except _Cut as e:
                    last = line - 1
                    msg = (
                        f"{e}: the file is cut or damaged after line {last}, its last complete line "
                        f"({len(carry)} bytes of line {line} follow)"
                    )
                    if on_truncated is None:
                        raise DataError(
                            path,
                            line,
                            msg,
                            hint=f" (copy the file again, or pass --on-error skip to keep its {last} complete lines)",
                        ) from None
                    on_truncated(source, line, msg)
                    break
                except OSError as e:
                    raise DataError(
                        path, line, f"cannot read the file after line {line - 1}: {e}", skippable=False
                    ) from None
                if not block:
                    if carry:
                        yield Chunk(source, offset, line, carry, raw_pos)
                    break
                buf = carry + block if carry else block
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    carry = buf
                    continue
                data, carry = buf[:cut], buf[cut:]
                yield Chunk(source, offset, line, data, raw_pos)
                offset += len(data)
                line += data.count(b"\n")
