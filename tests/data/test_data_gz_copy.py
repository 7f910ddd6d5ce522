"""The JSONL path's decompressed copy of a ``.jsonl.gz`` file has no name on disk and is freed
when its process ends, however it ends: nothing is left beside the sample info (no
``.decompressed/`` folder) after a normal exit, an exception, SIGTERM or SIGKILL, and after a
trainer run through the JSONL fallback (``--no-tokens`` preprocessing) that succeeds or fails.
Reading through the copy gives the same samples as the plain file."""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hbp.data import SFTDataset, preprocess
from megatron_hbp.data.testing import write_wordlevel_tokenizer
from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "naïve", "東京"]


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 20)))},
                    {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 120)))},
                ]
            }
        )
        for _ in range(n)
    ]


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def gz_info(tmp_path):
    """(sample info path, plain-file sample info path): the same lines as .jsonl.gz and .jsonl."""
    tok = write_wordlevel_tokenizer(tmp_path / "tok" / "tokenizer.json", WORDS)
    text = "\n".join(_lines(300)) + "\n"
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "c.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "c.jsonl").write_text(text)
    kw = dict(tokenizer=tok, template="plain", progress=False, tokens=False)
    preprocess(tmp_path / "gz" / "c.jsonl.gz", tmp_path / "gz" / "si.npz", **kw)
    preprocess(tmp_path / "plain" / "c.jsonl", tmp_path / "plain" / "si.npz", **kw)
    return tmp_path / "gz" / "si.npz", tmp_path / "plain" / "si.npz"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_copy_is_unnamed_and_reads_like_the_plain_file(gz_info, capsys):
    si, plain_si = gz_info
    before = _listing(si.parent)
    ds, ref = SFTDataset(si), SFTDataset(plain_si)
    out = capsys.readouterr().out
    size = len(gzip.decompress((si.parent / "c.jsonl.gz").read_bytes()))
    assert f"decompressed {si.parent / 'c.jsonl.gz'} for random access: {size / 2**20:.1f} MiB" in out
    # The copy exists (an open descriptor of the right size in the sample info's folder) but has
    # no name there: the kernel frees it with the last descriptor.
    (f,) = ds._copies.values()
    target = os.readlink(f"/proc/self/fd/{f.fileno()}")
    assert target.startswith(str(si.parent)) and target.endswith("(deleted)"), target
    assert os.fstat(f.fileno()).st_size == size
    assert _listing(si.parent) == before
    for i in [0, 1, len(ds) // 2, len(ds) - 1]:
        a, b = ds[i], ref[i]
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
    ds.close()
    assert ds[3].input_ids.tolist() == ref[3].input_ids.tolist()  # made again after close()


def test_forked_workers_share_the_parents_copy(gz_info, capfd):
    import torch

    si, plain_si = gz_info
    ds, ref = SFTDataset(si), SFTDataset(plain_si)
    ds[0]  # the parent reads too: pread keeps no shared file position
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        collate_fn=lambda s: s.input_ids.tolist(),
        multiprocessing_context="fork",
    )
    assert list(loader) == [ref[i].input_ids.tolist() for i in range(len(ref))]
    assert capfd.readouterr().out.count("[hbp] decompressed") == 1  # the parent's, not one per worker


_CHILD = """
import os, signal, sys, time
from megatron_hbp.data import SFTDataset
ds = SFTDataset(sys.argv[1])
n = sum(len(ds[i]) for i in range(len(ds)))
print("ready", os.getpid(), n, flush=True)
how = sys.argv[2]
if how == "exception":
    raise RuntimeError("boom after reading")
if how in ("sigterm", "sigkill"):
    time.sleep(60)  # the test signals this process
"""


@pytest.mark.parametrize("how", ["exit", "exception", "sigterm", "sigkill"])
def test_nothing_left_after_any_exit(gz_info, how):
    si, _ = gz_info
    before = _listing(si.parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(si), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("ready"):
            line = proc.stdout.readline()
        assert line.startswith("ready"), proc.stderr.read()[-3000:]
        if how in ("sigterm", "sigkill"):
            proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    want = {"exit": 0, "exception": 1, "sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL}[how]
    assert rc == want, proc.stderr.read()[-3000:]
    assert _listing(si.parent) == before
    assert not (si.parent / ".decompressed").exists()


# ------------------------------------------------------------------- the trainer's JSONL fallback


def _trainer_run(tmp_path: Path, corrupt: bool) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    from megatron_hbp.configio import from_dict
    from megatron_hbp.data import load_sample_info
    from megatron_hbp.planner import PlanConfig, build_plan

    d = tmp_path / "run"
    d.mkdir()
    data = d / "c.jsonl.gz"
    data.write_bytes(gzip.compress(("\n".join(_lines(120, seed=1)) + "\n").encode()))
    run_command(
        [sys.executable, "tools/preprocess_lengths.py", "--data", data, "--template", "plain",
         "--output", d / "si.npz", "--no-tokens", "--workers", "1"],
        timeout=300,
    )  # fmt: skip
    assert not list(d.glob("si.tokens*")), "--no-tokens wrote token files"
    info = load_sample_info(d / "si.npz")
    pcfg = from_dict(
        PlanConfig,
        {"groups": [{"pack_length": 1024, "cp": 1}], "world_size": 1, "tokens_per_step": 1024, "seed": 0},
    )
    build_plan(info.lengths, info.loss_tokens, pcfg, fingerprint=info.fingerprint).save(d / "plan.npz")
    if corrupt:  # same bytes count, other words: every line's CRC differs from the preprocessed one
        data.write_bytes(gzip.compress(gzip.decompress(data.read_bytes()).replace(b"fox", b"cat")))
    before = _listing(d)
    cfg = tmp_path / "run.yaml"  # outside d: d's listing is compared
    cfg.write_text(
        json.dumps(
            {
                "model": "tiny",
                "dtype": "fp32",
                "data": {"sample_info": str(d / "si.npz"), "num_workers": 1},  # a forked reader too
                "plan": {"path": str(d / "plan.npz")},
            }
        )
    )  # JSON is YAML
    cmd = [
        sys.executable, "examples/pretrain_llama_hbp.py", "--config", str(cfg), "--max-steps", "2",
        "--metrics-file", str(d / "metrics.jsonl"),
    ]  # fmt: skip
    proc = run_command(cmd, timeout=600, check=False)  # tests/distributed.py: hard timeout, group kill
    return proc, d, before


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [False, True], ids=["normal", "exception"])
def test_trainer_jsonl_fallback_leaves_no_copy(tmp_path, corrupt):
    proc, d, before = _trainer_run(tmp_path, corrupt)
    log = proc.stdout + proc.stderr
    assert "samples from the JSONL (tokenised on access)" in log, log[-3000:]
    assert f"decompressed {d / 'c.jsonl.gz'} for random access" in log, log[-3000:]
    if corrupt:
        assert proc.returncode != 0 and "differs from the one preprocessed" in log, log[-3000:]
        assert _listing(d) == before
    else:
        assert proc.returncode == 0, log[-3000:]
        assert _listing(d) == sorted([*before, "metrics.jsonl"])
    assert not (d / ".decompressed").exists()
