"""The embedded demo dataset: real long-context SFT-like chat data built from the Python standard library.

No data ships with the repo: :func:`ensure_demo_data` builds it once, deterministically
(same bytes for the same Python version), from the source files of the interpreter's own
standard library (PSF licence; the licence text is copied next to the data). It takes about a
second and makes:

- ``NUM_SHORT`` (3000) short conversations, tens to a few thousand tokens: questions about a
  function or class answered by its docstring, "explain this code" with the function's source,
  "write the docstring", one-line summaries, and multi-turn chats about one module; some have a
  system prompt; about a third use the ShareGPT format, the rest the OpenAI format;
- ``NUM_LONG`` (36) long documents, 8K–64K tokens with the default tokenizer: a whole
  standard-library source file followed by 2–4 questions about its functions.

The lines are shuffled together with a fixed seed, like a real mixed SFT set.
"""

from __future__ import annotations

import bisect
import inspect
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

__all__ = ["ensure_demo_data", "build_demo_data", "stdlib_dir", "NUM_SHORT", "NUM_LONG"]

BUILDER_VERSION = 1
NUM_SHORT = 3000
NUM_LONG = 36
SEED = 20261126
# 2.9–3.9 characters per token for standard-library source with the default tokenizer:
# 36–180 KB of source stays inside 8K–64K tokens (tests check it with the real tokenizer).
LONG_MIN_CHARS, LONG_MAX_CHARS = 36_000, 180_000
# Every fourth long document joins consecutive modules up to this size, so that lengths
# spread over the whole 8K–64K range instead of clustering at 10K–30K.
LONG_JOIN_CHARS = 120_000
MAX_SNIPPET_CHARS = 12_000

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "tkinter",
    "turtledemo",
}
_DEF_RX = re.compile(
    r'^([ \t]*)(?:async[ \t]+)?(def|class)[ \t]+(\w+)[ \t]*(\([^)]*\))?[^\n]*:[ \t]*\n[ \t]*[rRuU]?("""|\'\'\')(.*?)\5',
    re.S | re.M,
)
_SYSTEM_PROMPTS = (
    "You are a helpful assistant who knows the Python standard library well.",
    "You are an expert Python developer. Answer precisely and quote the documentation when useful.",
    "Answer questions about Python code. Be accurate.",
)


def stdlib_dir() -> Path:
    """The interpreter's standard-library folder (the text source of the demo data)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(lib: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("config-", "__")))
        out += [Path(root) / f for f in sorted(files) if f.endswith(".py")]
    return out


def _module_name(lib: Path, path: Path) -> str:
    parts = list(path.relative_to(lib).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _Definition:
    __slots__ = ("module", "kind", "name", "signature", "doc", "source")

    def __init__(self, module, kind, name, signature, doc, source):
        self.module, self.kind, self.name, self.signature, self.doc, self.source = (
            module,
            kind,
            name,
            signature,
            doc,
            source,
        )


def _definitions(module: str, text: str) -> list[_Definition]:
    """Functions and classes with a docstring; ``source`` = the definition without its docstring."""
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    lines = text.split("\n")
    out = []
    for m in _DEF_RX.finditer(text):
        doc = inspect.cleandoc(m.group(6))
        if len(doc) < 40 or len(doc) > 6000:
            continue
        indent = len(m.group(1).expandtabs())
        first = bisect.bisect_right(line_starts, m.start()) - 1
        last = first + 1
        while last < len(lines):
            ln = lines[last]
            if ln.strip() and len(ln) - len(ln.lstrip()) <= indent and last > first:
                break
            last += 1
        body = "\n".join(lines[first:last]).rstrip()
        body = body.replace(m.group(5) + m.group(6) + m.group(5), m.group(5) + "..." + m.group(5), 1)
        signature = re.sub(r"\s+", " ", m.group(4) or "")
        out.append(_Definition(module, m.group(2), m.group(3), signature, doc, body))
    return out


def _turn(fmt: str, role: str, text: str) -> dict:
    if fmt == "openai":
        return {"role": role, "content": text}
    return {"from": {"user": "human", "assistant": "gpt", "system": "system"}[role], "value": text}


def _line(fmt: str, turns: list[tuple[str, str]]) -> str:
    key = "messages" if fmt == "openai" else "conversations"
    return json.dumps({key: [_turn(fmt, r, t) for r, t in turns]}, ensure_ascii=False)


def _first_paragraph(doc: str) -> str:
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def _short_conversation(
    rng: random.Random, d: _Definition, same_module: list[_Definition]
) -> list[tuple[str, str]]:
    what = f"`{d.module}.{d.name}{d.signature if d.kind == 'def' else ''}`"
    kind = rng.random()
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.3:
        turns.append(("system", rng.choice(_SYSTEM_PROMPTS)))
    if kind < 0.3:
        turns += [("user", f"What does {what} do?"), ("assistant", d.doc)]
    elif kind < 0.45:
        turns += [("user", f"In one sentence: what is {what} for?"), ("assistant", _first_paragraph(d.doc))]
    elif kind < 0.65 and len(d.source) <= MAX_SNIPPET_CHARS:
        turns += [
            ("user", f"Explain what this code from `{d.module}` does:\n\n```python\n{d.source}\n```"),
            ("assistant", d.doc),
        ]
    elif kind < 0.8 and len(d.source) <= MAX_SNIPPET_CHARS:
        turns += [
            (
                "user",
                f"Write the docstring for this {'function' if d.kind == 'def' else 'class'}:\n\n{d.source}",
            ),
            ("assistant", d.doc),
        ]
    else:
        others = [o for o in same_module if o is not d]
        picks = [d] + rng.sample(others, min(len(others), rng.randint(1, 4)))
        for i, p in enumerate(picks):
            q = f"And `{p.name}`?" if i else f"I am reading the `{p.module}` module. What does `{p.name}` do?"
            turns += [("user", q), ("assistant", p.doc)]
    return turns


def _long_conversation(rng: random.Random, modules: list[str], texts: dict, defs: list[_Definition]):
    picks = rng.sample(defs, min(len(defs), rng.randint(2, 4)))
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.5:
        turns.append(("system", rng.choice(_SYSTEM_PROMPTS)))
    head = "".join(
        f"Here is the full source of the Python standard-library module `{m}`:\n\n```python\n{texts[m]}\n```\n\n"
        for m in modules
    )
    for i, p in enumerate(picks):
        q = f"Based on the code above, what does `{p.name}` do?" if i == 0 else f"What about `{p.name}`?"
        turns += [("user", head + q if i == 0 else q), ("assistant", p.doc)]
    return turns


def build_demo_data(out_dir: str | os.PathLike, *, lib: str | os.PathLike | None = None) -> Path:
    """Build the demo data into ``out_dir`` (``demo.jsonl``, ``LICENSE-PSF.txt``, ``README.txt``)
    and return the JSONL path. Deterministic: sorted file lists and a fixed seed."""
    lib = Path(lib) if lib is not None else stdlib_dir()
    out_dir = Path(out_dir)
    files = _source_files(lib)
    if not files:
        raise FileNotFoundError(f"no Python source files under {lib}: cannot build the demo data")
    texts = {}
    defs_by_module: dict[str, list[_Definition]] = {}
    for path in files:
        module = _module_name(lib, path)
        text = path.read_text(encoding="utf-8", errors="replace")
        texts[module] = text
        defs = _definitions(module, text)
        if defs:
            defs_by_module[module] = defs

    rng = random.Random(SEED)
    lines: list[str] = []
    # Long documents: evenly spaced over the sorted candidates, for a spread of lengths.
    candidates = [
        m
        for m in sorted(texts)
        if LONG_MIN_CHARS <= len(texts[m]) <= LONG_MAX_CHARS and len(defs_by_module.get(m, [])) >= 4
    ]
    if len(candidates) < NUM_LONG:
        raise RuntimeError(f"only {len(candidates)} standard-library files fit the long-document size range")
    step = len(candidates) / NUM_LONG
    for i in range(NUM_LONG):
        j = int(i * step)
        modules, size = [candidates[j]], len(texts[candidates[j]])
        while i % 4 == 3 and size < LONG_JOIN_CHARS and j + 1 < len(candidates):
            j += 1
            if size + len(texts[candidates[j]]) > LONG_MAX_CHARS:
                break
            modules.append(candidates[j])
            size += len(texts[candidates[j]])
        fmt = "sharegpt" if i % 3 == 2 else "openai"
        defs = [d for m in modules for d in defs_by_module[m]]
        lines.append(_line(fmt, _long_conversation(rng, modules, texts, defs)))

    all_defs = [d for m in sorted(defs_by_module) for d in defs_by_module[m]]
    rng.shuffle(all_defs)
    for i in range(NUM_SHORT):
        d = all_defs[i % len(all_defs)]
        fmt = "sharegpt" if rng.random() < 0.33 else "openai"
        lines.append(_line(fmt, _short_conversation(rng, d, defs_by_module[d.module])))
    rng.shuffle(lines)

    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "demo.jsonl"
    _atomic_write(jsonl, ("\n".join(lines) + "\n").encode("utf-8"))
    lic = lib / "LICENSE.txt"
    if lic.is_file():
        shutil.copyfile(lic, out_dir / "LICENSE-PSF.txt")
    readme = (
        "Demo SFT data for megatron-hbp, generated by megatron_hbp/data/demo.py\n"
        f"(builder version {BUILDER_VERSION}, seed {SEED}) from the source files and docstrings of the\n"
        f"Python {sys.version.split()[0]} standard library at {lib}.\n"
        "That text is licensed under the Python Software Foundation License (see LICENSE-PSF.txt).\n"
        f"{NUM_SHORT} short conversations + {NUM_LONG} long documents with questions; one JSON object per line\n"
        "(OpenAI 'messages' or ShareGPT 'conversations' format).\n"
    )
    (out_dir / "README.txt").write_text(readme, encoding="utf-8")
    return jsonl


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stamp() -> str:
    return f"builder={BUILDER_VERSION} python={sys.version.split()[0]} stdlib={stdlib_dir()}\n"


def ensure_demo_data(cache_dir: str | os.PathLike = "cache/demo") -> Path:
    """Return the demo JSONL under ``cache_dir``, building it first when it is missing or was
    built by another builder version / Python version (recorded in ``cache_dir/.stamp``)."""
    cache_dir = Path(cache_dir)
    jsonl, stamp = cache_dir / "demo.jsonl", cache_dir / ".stamp"
    if jsonl.is_file() and stamp.is_file() and stamp.read_text() == _stamp():
        return jsonl
    build_demo_data(cache_dir)
    stamp.write_text(_stamp())
    return jsonl
