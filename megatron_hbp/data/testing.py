"""Small helpers for tests: hand-checkable tokenizers and JSONL writers (no downloads)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

__all__ = ["write_wordlevel_tokenizer", "write_jsonl", "openai_line", "sharegpt_line"]


def write_wordlevel_tokenizer(
    path: str | os.PathLike,
    words: list[str],
    special: list[str] = ("<unk>", "<s>", "</s>"),
    config: dict | None = None,
) -> Path:
    """Write a Hugging Face ``tokenizer.json`` whose ids are predictable by hand.

    Ids: ``special`` tokens first (0, 1, ...), then ``words`` in order. Text is split by the
    ``Whitespace`` pre-tokenizer (``\\w+`` runs and runs of other non-space characters; spaces and
    newlines produce no token); an unknown word maps to ``<unk>``. ``config`` (for example
    ``{"bos_token": "<s>"}``) is written as ``tokenizer_config.json`` beside it.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(list(special) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(path))
    if config is not None:
        (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def openai_line(*turns: tuple[str, str]) -> str:
    """One OpenAI-format JSONL line from ``(role, content)`` pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def sharegpt_line(*turns: tuple[str, str]) -> str:
    """One ShareGPT-format JSONL line from ``(from, value)`` pairs (``human``/``gpt``/``system``)."""
    return json.dumps({"conversations": [{"from": r, "value": c} for r, c in turns]})


def write_jsonl(path: str | os.PathLike, lines: list[str | bytes]) -> Path:
    """Write lines (``str`` encoded as UTF-8, ``bytes`` as is) joined by newlines; ``*.gz`` is gzipped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path
