"""Nothing hangs, nothing is lost: truncated / corrupt .jsonl.gz with 1 and 2 workers, with and
without --on-error skip (CLI subprocesses under a timeout), a worker that dies, every error class
of the package pickling intact, a UTF-8 BOM, empty assistant content."""

import gzip
import importlib
import inspect
import pickle
import pkgutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import megatron_hbp
from megatron_hbp.data import DataError, SFTDataset, preprocess
from megatron_hbp.data.formats import LineError, parse_line
from megatron_hbp.data.testing import openai_line, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["System", "User", "Assistant", ":", "hi", "hello", "there", "be", "brief"]
TIMEOUT = 120  # seconds; the bug this guards against was an infinite wait


def chat_lines(n):
    rng = np.random.default_rng(1)
    words = ["hi", "hello", "there", "be", "brief"]
    return [
        openai_line(
            ("user", " ".join(rng.choice(words, 1 + i % 7))),
            ("assistant", " ".join(rng.choice(words, 1 + i % 11))),
        )
        for i in range(n)
    ]


def truncated_gz(tmp_path, n=400):
    """A .jsonl.gz cut in the middle of its compressed bytes, as a failed copy leaves it, and the
    number of complete lines before the cut (by an independent decompression with zlib)."""
    lines = chat_lines(n)
    whole = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    cut = whole[: len(whole) // 2]
    path = tmp_path / "truncated.jsonl.gz"
    path.write_bytes(cut)
    prefix = zlib.decompressobj(31).decompress(cut)
    complete = prefix.count(b"\n")
    assert 100 <= complete < n  # the cut is mid-file
    return path, lines, complete


def run_cli(args, timeout=TIMEOUT):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "preprocess_lengths.py"), "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,  # a hang fails the test (TimeoutExpired) instead of blocking the suite
        cwd=ROOT,
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_gz_raises_naming_last_complete_line(tmp_path, tok, workers):
    path, _, complete = truncated_gz(tmp_path)
    out = tmp_path / "si.npz"
    r = run_cli(
        ["--data", path, "--tokenizer", tok, "--output", out, "--workers", workers, "--chunk-bytes", 2000]
    )
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert err[0].startswith(f"error: {path.resolve()}:{complete + 1}: the compressed data ends early")
    assert f"after line {complete}, its last complete line" in err[0]
    assert f"--on-error skip to keep its {complete} complete lines" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_truncated_gz_skip_keeps_every_complete_line(tmp_path, tok, workers):
    path, lines, complete = truncated_gz(tmp_path)
    out = tmp_path / "si.npz"
    r = run_cli(
        [
            "--data",
            path,
            "--tokenizer",
            tok,
            "--output",
            out,
            "--workers",
            workers,
            "--chunk-bytes",
            2000,
            "--on-error",
            "skip",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert f"truncated.jsonl.gz:{complete + 1}: the compressed data ends early" in r.stderr  # warning
    assert "truncated_file 1" in r.stdout  # in the summary's skipped counts
    # Reference: the same complete lines in a plain file.
    ref = write_jsonl(tmp_path / "ref.jsonl", lines[:complete])
    want = preprocess(ref, tmp_path / "ref.npz", tokenizer=tok).info
    got = np.load(out)
    assert got["lengths"].tolist() == want.lengths.tolist() and len(want) == complete
    assert got["line"].tolist() == list(range(1, complete + 1))
    assert [(int(s["line"]), str(s["reason"]).split(":")[0]) for s in got["skipped"]] == [
        (complete + 1, "truncated_file")
    ]
    # The dataset reads the samples before the cut from the damaged file.
    ds = SFTDataset(out, tmp_dir=tmp_path / "dec")
    ref_ds = SFTDataset(want)
    for i in (0, complete - 1):
        assert ds[i].input_ids.tolist() == ref_ds[i].input_ids.tolist()


def test_corrupt_gz(tmp_path, tok):
    # A wrong CRC in the trailer (zlib checks it at the end of the member): every line decoded,
    # the damage still reported; a broken header: nothing readable.
    lines = chat_lines(300)
    whole = bytearray(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    whole[-8] ^= 0xFF
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(bytes(whole))
    with pytest.raises(
        DataError, match=r"bad\.jsonl\.gz:301: corrupt compressed data .*incorrect data check"
    ):
        preprocess(path, tmp_path / "si.npz", tokenizer=tok)
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok, on_error="skip").info
    assert len(info) == 300 and info.stats["skipped_bad_input"] == {"truncated_file": 1}
    assert info.skipped[0].reason.startswith("truncated_file: corrupt compressed data")
    path.write_bytes(b"PK\x03\x04" + bytes(whole[4:]))  # not gzip at all (a zip file renamed)
    with pytest.raises(
        DataError, match=r"bad\.jsonl\.gz:1: corrupt compressed data .*incorrect header check"
    ):
        preprocess(path, tmp_path / "si.npz", tokenizer=tok)


def test_multi_member_gz_and_empty_gz(tmp_path, tok):
    lines = chat_lines(6)
    a = gzip.compress(("\n".join(lines[:3]) + "\n").encode())
    b = gzip.compress(("\n".join(lines[3:]) + "\n").encode())
    path = tmp_path / "cat.jsonl.gz"
    path.write_bytes(a + b)  # `cat a.gz b.gz` is a valid gzip file
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok).info
    assert info.line.tolist() == [1, 2, 3, 4, 5, 6] and not info.skipped
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(gzip.compress(b""))
    assert len(preprocess([path, empty], tmp_path / "e.npz", tokenizer=tok).info) == 6


def test_worker_death_ends_the_run(tmp_path, tok):
    # A worker killed mid-chunk (as the OOM killer does) must end the run with an error, not a hang.
    data = write_jsonl(tmp_path / "d.jsonl", chat_lines(300))
    script = textwrap.dedent(
        f"""
        import importlib, os, sys
        pp = importlib.import_module("megatron_hbp.data.preprocess")  # the module, not the function
        parent = os.getpid()
        real = pp._process_chunk
        def dying(chunk, *a):
            if os.getpid() != parent and chunk.line > 100:
                os._exit(9)
            return real(chunk, *a)
        pp._process_chunk = dying  # inherited by the forked workers
        try:
            pp.preprocess({str(data)!r}, {str(tmp_path / "si.npz")!r}, tokenizer={str(tok)!r}, workers=2, chunk_bytes=2000)
        except pp.WorkerError as e:
            print("WorkerError:", e)
            sys.exit(3)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 3, r.stderr
    assert "a preprocessing worker process died" in r.stdout and "--workers 1" in r.stdout


def test_worker_exception_crosses_the_process_boundary(tmp_path, tok, monkeypatch):
    # An exception raised inside a worker (not a bad line) reaches the caller as is.
    pp = importlib.import_module("megatron_hbp.data.preprocess")  # the module, not the function
    data = write_jsonl(tmp_path / "d.jsonl", chat_lines(200))

    def failing(chunk, *a):
        raise DataError("some.jsonl", chunk.line, "synthetic failure", skippable=False)

    monkeypatch.setattr(pp, "_process_chunk", failing)
    with pytest.raises(DataError, match=r"^some\.jsonl:1: synthetic failure$"):
        pp.preprocess(data, tmp_path / "si.npz", tokenizer=tok, workers=2, chunk_bytes=2000)


def _all_error_classes():
    found = {}
    for m in pkgutil.walk_packages(megatron_hbp.__path__, "megatron_hbp."):
        mod = importlib.import_module(m.name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == mod.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


# Constructor arguments for classes whose __init__ is not (message,).
SPECIAL_ARGS = {
    "megatron_hbp.data.formats.DataError": ("f.jsonl", 7, "bad", False, " (hint)"),
    "megatron_hbp.mcore.preemption.Preempted": (4, "ck/step_4", "SIGTERM"),
}


def test_every_error_class_pickles():
    classes = _all_error_classes()
    assert "megatron_hbp.data.formats.DataError" in classes and "megatron_hbp.configio.ConfigError" in classes
    assert len(classes) >= 12
    for name, cls in sorted(classes.items()):
        e = cls(*SPECIAL_ARGS.get(name, ("something went wrong",)))
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls and str(back) == str(e) and back.args == e.args, name
        assert vars(back) == vars(e), name
    e = DataError("f.jsonl", 3, "bad line")
    back = pickle.loads(pickle.dumps(e))
    assert (back.file, back.line, back.reason, str(back)) == ("f.jsonl", 3, "bad line", str(e))
    assert str(back) == "f.jsonl:3: bad line (fix or remove the line, or pass --on-error skip to skip it)"


def test_bom_is_accepted(tmp_path, tok):
    line = openai_line(("user", "hi"), ("assistant", "hello there"))
    assert parse_line(b"\xef\xbb\xbf" + line.encode()) == [("user", "hi"), ("assistant", "hello there")]
    path = write_jsonl(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + line.encode(), line])
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok).info
    assert info.lengths.tolist() == [9, 9]  # <s> User : hi Assistant : hello there </s>
    assert SFTDataset(info)[0].input_ids.tolist() == SFTDataset(info)[1].input_ids.tolist()


def test_empty_response_is_a_skip_kind(tmp_path, tok):
    with pytest.raises(
        LineError, match=r"empty response: messages\[1\] is an assistant turn with empty 'content'"
    ):
        parse_line(openai_line(("user", "hi"), ("assistant", "")).encode())
    with pytest.raises(LineError, match=r"empty response: conversations\[3\]"):
        parse_line(
            b'{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hi"}, '
            b'{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  \\n"}]}'
        )
    good = openai_line(("user", "hi"), ("assistant", "hi"))
    path = write_jsonl(tmp_path / "e.jsonl", [good, openai_line(("user", "hi"), ("assistant", " ")), good])
    with pytest.raises(DataError, match=r"e\.jsonl:2: empty response"):
        preprocess(path, tmp_path / "si.npz", tokenizer=tok)
    info = preprocess(path, tmp_path / "si.npz", tokenizer=tok, on_error="skip").info
    assert info.line.tolist() == [1, 3] and info.stats["skipped_bad_input"] == {"empty_response": 1}


@pytest.mark.parametrize("workers", [1, 2])
def test_first_error_in_file_order(tmp_path, tok, workers):
    # A bad line in the first file is reported before the truncation of the second, whatever
    # the read-ahead of the workers (found running the quickstart on a folder of files).
    gz, _, _ = truncated_gz(tmp_path)
    lines = chat_lines(300)
    lines[10] = "{oops"
    a = write_jsonl(tmp_path / "a.jsonl", lines)
    with pytest.raises(DataError, match=r"a\.jsonl:11: malformed JSON"):
        preprocess([a, gz], tmp_path / "si.npz", tokenizer=tok, workers=workers)  # one chunk per file
