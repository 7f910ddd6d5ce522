"""Sample-info preprocessing: hand-counted lengths, bad input, overflow, cache, .npz round trip, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_hbp.data import DataError, SampleInfo, load_sample_info, preprocess, save_sample_info
from megatron_hbp.data.testing import openai_line, sharegpt_line, write_jsonl, write_wordlevel_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["System", "User", "Assistant", ":", "hi", "hello", "there", "be", "brief"]

# Plain template, word-level vocabulary (every word one token, "<s>"/"</s>" one token each):
LINES = [
    # <s> User : hi Assistant : [hello there </s>]                                  9 tokens, 3 loss
    openai_line(("user", "hi"), ("assistant", "hello there")),
    # <s> System : be brief User : hi Assistant : [hi </s>]                        12 tokens, 2 loss
    sharegpt_line(("system", "be brief"), ("human", "hi"), ("gpt", "hi")),
    "",
    # <s> User : hello x4 Assistant : [hi </s>] User : hi Assistant : [there there </s>]  19 tokens, 5 loss
    openai_line(
        ("user", "hello hello hello hello"), ("assistant", "hi"), ("user", "hi"), ("assistant", "there there")
    ),
]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", LINES)


def offsets_of(lines):
    starts = np.cumsum([0] + [len(x.encode()) + 1 for x in lines[:-1]])
    return starts.tolist()


def test_hand_counted_lengths(tmp_path, tok, data):
    info = preprocess(data, tmp_path / "si.npz", tokenizer=tok).info
    assert info.lengths.tolist() == [9, 12, 19]
    assert info.loss_tokens.tolist() == [3, 2, 5]
    assert info.line.tolist() == [1, 2, 4]
    assert info.offset.tolist() == [offsets_of(LINES)[i] for i in (0, 1, 3)]
    assert info.source.tolist() == [0, 0, 0] and info.files == [str(data.resolve())]
    assert info.stats["blank_lines"] == 1 and info.stats["tokens"] == 40 and info.stats["loss_tokens"] == 10


def test_truncate_and_drop(tmp_path, tok, data):
    info = preprocess(data, tmp_path / "t.npz", tokenizer=tok, max_length=10).info
    # line 2 cut to 10 tokens keeps no assistant token -> dropped; line 4 keeps "hi" (10th token).
    assert info.lengths.tolist() == [9, 10] and info.loss_tokens.tolist() == [3, 1]
    assert info.truncated.tolist() == [False, True] and info.line.tolist() == [1, 4]
    assert info.stats["truncated"] == 1 and info.stats["dropped_no_loss_after_truncation"] == 1
    assert [(r.line, r.reason.split(":")[0]) for r in info.skipped] == [(2, "no_loss_after_truncation")]
    info = preprocess(data, tmp_path / "d.npz", tokenizer=tok, max_length=10, overflow="drop").info
    assert (
        info.lengths.tolist() == [9] and info.stats["dropped_too_long"] == 2 and info.stats["truncated"] == 0
    )
    assert [r.line for r in info.skipped] == [2, 4]
    assert "19 tokens > max_length 10" in info.skipped[1].reason


BAD = {
    "malformed_json": ('{"messages": [{"role": "user"', "malformed JSON"),
    "missing_messages_key": (
        '{"prompt": "hi", "completion": "x"}',
        "neither a 'messages' nor a 'conversations'",
    ),
    "unknown_role": (openai_line(("user", "hi"), ("tool", "x"), ("assistant", "hi")), "unknown role 'tool'"),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "invalid UTF-8"),
    "no_assistant_turn": (openai_line(("user", "hi")), "no assistant turn"),
    "empty_conversation": ('{"conversations": []}', "empty conversation"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_line_raises_with_file_and_line(tmp_path, tok, kind):
    line, what = BAD[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [LINES[0], LINES[1], line, LINES[3]])
    out = tmp_path / "si.npz"
    with pytest.raises(DataError) as e:
        preprocess(path, out, tokenizer=tok)
    assert (e.value.file, e.value.line) == (str(path.resolve()), 3)
    msg = str(e.value)
    assert msg.startswith(f"{path.resolve()}:3: ") and what in msg and "--on-error skip" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "tok"]  # nothing (half-)written


def test_skip_counts_and_records_lines(tmp_path, tok):
    kinds = sorted(BAD)
    lines = [LINES[0]] + [BAD[k][0] for k in kinds] + [LINES[3]]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok, on_error="skip").info
    assert info.lengths.tolist() == [9, 19] and info.line.tolist() == [1, len(lines)]
    assert info.stats["skipped_bad_input"] == {k: 1 for k in kinds}
    assert [(r.line, r.reason.split(":")[0]) for r in info.skipped] == [
        (i + 2, k) for i, k in enumerate(kinds)
    ]
    with np.load(tmp_path / "si.npz") as z:  # the skipped list is in the file itself
        assert z["skipped"]["line"].tolist() == list(range(2, 2 + len(kinds)))


def test_missing_inputs(tmp_path, tok, data):
    with pytest.raises(FileNotFoundError, match="data file .*nope.jsonl does not exist"):
        preprocess(tmp_path / "nope.jsonl", tmp_path / "si.npz", tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer file .*missing.model does not exist"):
        preprocess(data, tmp_path / "si.npz", tokenizer=tmp_path / "missing.model")
    with pytest.raises(ValueError, match="unknown chat template"):
        preprocess(data, tmp_path / "si.npz", tokenizer=tok, template="vicuna")


def test_cache_reuse_and_invalidation(tmp_path, tok, data):
    out = tmp_path / "si.npz"
    first = preprocess(data, out, tokenizer=tok)
    assert not first.reused
    stamp = out.stat().st_mtime_ns
    again = preprocess(data, out, tokenizer=tok)
    assert (
        again.reused and out.stat().st_mtime_ns == stamp and again.info.fingerprint == first.info.fingerprint
    )

    # Each change below must be detected, recomputed, and explained.
    r = preprocess(data, out, tokenizer=tok, template="llama3")
    assert not r.reused and "template: 'plain' -> 'llama3'" in r.changes
    r = preprocess(data, out, tokenizer=tok, max_length=10)
    assert not r.reused and "max_length: None -> 10" in r.changes
    other_tok = write_wordlevel_tokenizer(tmp_path / "tok2" / "tokenizer.json", WORDS + ["extra"])
    r = preprocess(data, out, tokenizer=other_tok, max_length=10)
    assert not r.reused and any(c.startswith("tokenizer_sha256") for c in r.changes)

    preprocess(data, out, tokenizer=tok)
    with open(data, "a") as f:
        f.write(openai_line(("user", "hi"), ("assistant", "hi")) + "\n")
    r = preprocess(data, out, tokenizer=tok)
    assert not r.reused and len(r.info) == 4
    assert r.changes == [f"file {data.resolve()} changed (size, mtime_ns)"]

    # Same size, new mtime (an in-place edit): detected by mtime.
    st = data.stat()
    data.write_bytes(data.read_bytes().replace(b'"hi"', b'"be"', 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    r = preprocess(data, out, tokenizer=tok)
    assert not r.reused and r.changes == [f"file {data.resolve()} changed (mtime_ns)"]
    assert preprocess(data, out, tokenizer=tok).reused
    assert not preprocess(data, out, tokenizer=tok, force=True).reused


def test_content_hash_ignores_touch_but_sees_edits(tmp_path, tok, data):
    out = tmp_path / "si.npz"
    preprocess(data, out, tokenizer=tok, content_hash=True)
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    assert preprocess(data, out, tokenizer=tok, content_hash=True).reused
    data.write_bytes(data.read_bytes().replace(b'"hi"', b'"be"', 1))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))  # same size and mtime as before
    r = preprocess(data, out, tokenizer=tok, content_hash=True)
    assert not r.reused and r.changes == [f"file {data.resolve()} changed (sha256)"]


def test_interrupted_write_leaves_no_output(tmp_path, tok, data, monkeypatch):
    out = tmp_path / "si.npz"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        preprocess(data, out, tokenizer=tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "tok"]


def test_npz_round_trip_and_keys(tmp_path):
    skipped = np.array(
        [(1, 7, "malformed_json: x")], dtype=[("source", np.int32), ("line", np.int64), ("reason", "U200")]
    )
    info = SampleInfo(
        lengths=np.array([5, 70000], np.int32),
        loss_tokens=np.array([2, 1], np.int32),
        source=np.array([0, 1], np.int32),
        offset=np.array([0, 2**33], np.int64),
        line=np.array([1, 9], np.int64),
        crc32=np.array([1, 2**32 - 1], np.uint32),
        truncated=np.array([False, True]),
        files=["/a.jsonl", "/b.jsonl.gz"],
        fingerprint="abc",
        fingerprint_inputs={"files": [], "max_length": 70000},
        tokenizer="/t.model",
        template="llama3",
        max_length=70000,
        truncate=True,
        skipped_array=skipped,
        stats={"samples": 2},
    )
    save_sample_info(info, tmp_path / "x.npz")
    back = load_sample_info(tmp_path / "x.npz")
    for name in ("lengths", "loss_tokens", "source", "offset", "line", "crc32", "truncated"):
        assert (
            np.array_equal(getattr(back, name), getattr(info, name))
            and getattr(back, name).dtype == getattr(info, name).dtype
        )
    assert (back.files, back.fingerprint, back.tokenizer, back.template) == (
        info.files,
        "abc",
        "/t.model",
        "llama3",
    )
    assert (back.max_length, back.truncate, back.stats, back.fingerprint_inputs) == (
        70000,
        True,
        {"samples": 2},
        {"files": [], "max_length": 70000},
    )
    assert [(r.file, r.line, r.reason) for r in back.skipped] == [("/b.jsonl.gz", 7, "malformed_json: x")]
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:  # planner reads these directly
        assert z["lengths"].dtype == np.int32 and z["loss_tokens"].dtype == np.int32
        assert z["fingerprint"].shape == () and str(z["fingerprint"]) == "abc"


def test_load_rejects_foreign_npz(tmp_path):
    np.savez(tmp_path / "other.npz", lengths=np.arange(3))
    with pytest.raises(ValueError, match="not a sample-info file"):
        load_sample_info(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="preprocess_lengths"):
        load_sample_info(tmp_path / "none.npz")


def test_gzip_matches_plain(tmp_path, tok):
    gz = write_jsonl(tmp_path / "chat.jsonl.gz", LINES)
    info = preprocess(gz, tmp_path / "si.npz", tokenizer=tok).info
    assert info.lengths.tolist() == [9, 12, 19]
    assert info.offset.tolist() == [offsets_of(LINES)[i] for i in (0, 1, 3)]  # decompressed offsets


def many_lines(n):
    rng = np.random.default_rng(0)
    words = ["hi", "hello", "there", "be", "brief"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, 40)))
        a = " ".join(rng.choice(words, rng.integers(1, 60)))  # an empty answer is a bad line
        out.append(
            openai_line(("user", q), ("assistant", a)) if i % 2 else sharegpt_line(("human", q), ("gpt", a))
        )
    return out


@pytest.mark.slow
def test_two_workers_match_one_and_report_true_line(tmp_path, tok):
    lines = many_lines(600)
    a = write_jsonl(tmp_path / "a.jsonl", lines[:300])
    b = write_jsonl(tmp_path / "b.jsonl.gz", lines[300:])
    one = preprocess([a, b], tmp_path / "1.npz", tokenizer=tok, chunk_bytes=2000).info
    two = preprocess([a, b], tmp_path / "2.npz", tokenizer=tok, workers=2, chunk_bytes=2000).info
    for name in ("lengths", "loss_tokens", "source", "offset", "line", "crc32"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert one.line.tolist() == list(range(1, 301)) * 2 and one.source.tolist() == [0] * 300 + [1] * 300
    lines[300 + 250] = "{oops"
    write_jsonl(b, lines[300:])
    with pytest.raises(DataError, match=r"b\.jsonl\.gz:251: malformed JSON"):
        preprocess([a, b], tmp_path / "3.npz", tokenizer=tok, workers=2, chunk_bytes=2000)
    # An error in the first chunk, with many chunks still to feed: stops promptly (no hang).
    lines[3] = '{"messages": [{"role": "user", "content": "hi"}]}'
    write_jsonl(a, lines[:300])
    with pytest.raises(DataError, match=r"a\.jsonl:4: conversation has no assistant turn"):
        preprocess([a, b], tmp_path / "4.npz", tokenizer=tok, workers=2, chunk_bytes=500)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["1.npz", "2.npz"]


def load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_lengths_cli", ROOT / "tools" / "preprocess_lengths.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_cli_summary_cache_plot_and_errors(tmp_path, tok, data, capsys):
    main = load_cli()
    out, png = tmp_path / "si.npz", tmp_path / "h.png"
    args = ["--data", str(data), "--tokenizer", str(tok), "--output", str(out), "--no-progress"]
    assert main(args + ["--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "samples 3   tokens 40   loss tokens 10 (25.0%)" in text
    assert "length: min 9  p50 12  p90 18  p99 19  max 19" in text
    assert "[    8,    16)          2   66.7%" in text and "[   16,    32)          1   33.3%" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 0
    assert "inputs unchanged: reusing cached" in capsys.readouterr().out

    bad = write_jsonl(tmp_path / "bad.jsonl", [LINES[0], "{nope"])
    assert main(["--data", str(bad), "--tokenizer", str(tok), "--output", str(tmp_path / "b.npz")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert (
        main(
            [
                "--data",
                str(bad),
                "--tokenizer",
                str(tok),
                "--output",
                str(tmp_path / "b.npz"),
                "--on-error",
                "skip",
            ]
        )
        == 0
    )
    assert "skipped (bad input) 1 (malformed_json 1)" in capsys.readouterr().out
    assert main(["--data", str(data), "--tokenizer", str(tmp_path / "x.model"), "--output", str(out)]) == 2
    assert "x.model does not exist" in capsys.readouterr().err


def test_cli_script_help():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_lengths.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "--on-error" in r.stdout and "--max-length" in r.stdout


def test_stats_are_json(tmp_path, tok, data):
    preprocess(data, tmp_path / "si.npz", tokenizer=tok)
    with np.load(tmp_path / "si.npz") as z:
        assert json.loads(str(z["stats"]))["samples"] == 3


def test_progress_bar_shows_rate_and_eta(tmp_path, tok, data, capsys):
    preprocess(data, tmp_path / "si.npz", tokenizer=tok, progress=True)
    err = capsys.readouterr().err
    assert "preprocess: 100%" in err and "3 samples" in err and "samples/s" in err and "<00:00" in err
    preprocess(data, tmp_path / "si2.npz", tokenizer=tok)  # not a terminal: no bar
    assert capsys.readouterr().err == ""
