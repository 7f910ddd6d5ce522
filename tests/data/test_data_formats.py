"""Readers: OpenAI / ShareGPT lines, every bad-input kind, path resolution, chunking."""

import gzip
import json
import zlib

import pytest

from megatron_hbp.data.formats import LineError, iter_chunks, parse_line, resolve_data_paths
from megatron_hbp.data.testing import openai_line, sharegpt_line, write_jsonl


def test_openai_line():
    raw = openai_line(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")).encode()
    assert parse_line(raw) == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]


def test_sharegpt_line_maps_roles():
    raw = sharegpt_line(
        ("system", "S"), ("human", "Q"), ("gpt", "A"), ("human", "Q2"), ("gpt", "A2")
    ).encode()
    assert parse_line(raw) == [
        ("system", "S"),
        ("user", "Q"),
        ("assistant", "A"),
        ("user", "Q2"),
        ("assistant", "A2"),
    ]


def test_openai_content_parts_are_joined():
    raw = json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "c"},
            ]
        }
    ).encode()
    assert parse_line(raw) == [("user", "ab"), ("assistant", "c")]


def test_utf8_content_and_crlf():
    raw = openai_line(("user", "Grüße ✓"), ("assistant", "日本語")).encode() + b"\r"
    assert parse_line(raw) == [("user", "Grüße ✓"), ("assistant", "日本語")]


def test_blank_line_is_none():
    assert parse_line(b"") is None
    assert parse_line(b"   \t") is None


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b'{"messages": [', "malformed JSON"),
        (b'{"text": "hello"}', "neither a 'messages' nor a 'conversations' key (keys: 'text')"),
        (b"[1, 2]", "JSON list, expected an object"),
        (
            openai_line(("user", "q"), ("tool", "x"), ("assistant", "a")).encode(),
            "messages[1] has unknown role 'tool'",
        ),
        (sharegpt_line(("human", "q"), ("bot", "a")).encode(), "conversations[1] has unknown role 'bot'"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "invalid UTF-8 at byte 46"),
        (b'{"messages": []}', "empty conversation"),
        (b'{"conversations": []}', "empty conversation"),
        (openai_line(("system", "s"), ("user", "q")).encode(), "no assistant turn"),
        (b'{"messages": "hi"}', "'messages' is str, expected a list"),
        (b'{"messages": [{"role": "user"}]}', "messages[0] has no 'content' field"),
        (
            b'{"messages": [{"role": "assistant", "content": 3}]}',
            "messages[0].content is int, expected a string",
        ),
    ],
)
def test_bad_lines(raw, expected):
    with pytest.raises(LineError) as e:
        parse_line(raw)
    assert expected in str(e.value)


def test_resolve_paths_file_dir_glob(tmp_path):
    a = write_jsonl(tmp_path / "d" / "b.jsonl", ["x"])
    b = write_jsonl(tmp_path / "d" / "sub" / "a.jsonl.gz", ["x"])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert resolve_data_paths([tmp_path / "d"]) == [a.resolve(), b.resolve()]
    assert resolve_data_paths([str(tmp_path / "d" / "*.jsonl")]) == [a.resolve()]
    # A file named twice (directly and via a directory) is read once.
    assert resolve_data_paths([a, tmp_path / "d"]) == [a.resolve(), b.resolve()]


@pytest.mark.parametrize(
    "spec, message",
    [("missing.jsonl", "data file .*missing.jsonl does not exist"), ("nomatch*.jsonl", "matched no files")],
)
def test_resolve_paths_errors(tmp_path, spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        resolve_data_paths([str(tmp_path / spec)])


def test_resolve_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_data_paths([tmp_path])


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_chunks_keep_lines_whole_with_exact_offsets(tmp_path, name):
    lines = [f'{{"n": {i}, "pad": "{"x" * (i * 7 % 50)}"}}' for i in range(40)]
    lines[10] = "y" * 300  # longer than a chunk
    path = write_jsonl(tmp_path / name, lines)
    plain = "\n".join(lines).encode() + b"\n"
    seen = []
    for c in iter_chunks([path], chunk_bytes=64):
        assert c.data.endswith(b"\n")
        assert plain[c.offset : c.offset + len(c.data)] == c.data  # offsets into the decompressed stream
        for j, ln in enumerate(c.data.split(b"\n")[:-1]):
            seen.append((c.line + j, ln))
    assert seen == [(i + 1, ln.encode()) for i, ln in enumerate(lines)]


def test_chunks_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"one\ntwo")
    chunks = list(iter_chunks([path], chunk_bytes=3))
    assert [(c.offset, c.line, c.data) for c in chunks] == [(0, 1, b"one\n"), (4, 2, b"two")]


def test_chunks_corrupt_gzip(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    good = gzip.compress(b"line\n" * 1000)
    cut = good[: len(good) // 2]
    path.write_bytes(cut)
    complete = zlib.decompressobj(31).decompress(cut).count(b"\n")  # independent reference
    chunks = []
    with pytest.raises(
        ValueError,
        match=rf"a.jsonl.gz:{complete + 1}: the compressed data ends early.* after line {complete},",
    ):
        for c in iter_chunks([path]):
            chunks.append(c)
    assert b"".join(c.data for c in chunks) == b"line\n" * complete  # every complete line came first
    cuts = []
    chunks = list(iter_chunks([path], on_truncated=lambda *a: cuts.append(a)))
    assert b"".join(c.data for c in chunks) == b"line\n" * complete and cuts[0][:2] == (0, complete + 1)
