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
from collections.abc import Iterable, Iterator
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


class LineError(ValueError):
    """One line is not a usable conversation (message says why; no file/line context)."""


class DataError(ValueError):
    """A data line is bad; names the file, the 1-based line number and the problem."""

    def __init__(self, file: str, line: int, reason: str, *, skippable: bool = True):
        self.file, self.line, self.reason = str(file), int(line), reason
        hint = " (fix or remove the line, or pass --on-error skip to skip it)" if skippable else ""
        super().__init__(f"{self.file}:{self.line}: {reason}{hint}")


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
    an empty conversation, or a conversation without an assistant turn.
    """
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
        conv.append((role, _content(turn[content_key], f"{key}[{i}].{content_key}")))
    if not has_assistant:
        raise LineError("conversation has no assistant turn (nothing to train on)")
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


def iter_chunks(paths: list[Path], chunk_bytes: int = 1 << 20) -> Iterator[Chunk]:
    """Cut each file into chunks of about ``chunk_bytes`` bytes that end on line boundaries
    (a chunk holds at least one whole line, however long). Lines are never split."""
    for source, path in enumerate(paths):
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip_path(path) else raw
            offset, line, carry = 0, 1, b""
            while True:
                try:
                    block = f.read(chunk_bytes)
                except (OSError, EOFError, zlib.error) as e:
                    raise DataError(
                        path, line, f"cannot read the file after line {line - 1}: {e}", skippable=False
                    ) from None
                if not block:
                    if carry:
                        yield Chunk(source, offset, line, carry, raw.tell())
                    break
                buf = carry + block if carry else block
                cut = buf.rfind(b"\n") + 1
                if cut == 0:
                    carry = buf
                    continue
                data, carry = buf[:cut], buf[cut:]
                yield Chunk(source, offset, line, data, raw.tell())
                offset += len(data)
                line += data.count(b"\n")
