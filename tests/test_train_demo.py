"""The README demo command end to end, on a fresh output folder (2 CPU processes, gloo).

Same command and config as the README (``configs/demo_tiny.yaml``), outputs redirected to a
temporary folder and fewer steps (the full demo runs 40) to keep the suite fast: it builds
the sample info of the embedded demo data and the two-group plan (CP 1 / CP 2), trains,
prints the plan report and a falling loss, and leaves metrics and a checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_demo_end_to_end(tmp_path):
    steps = 12
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "examples/pretrain_llama_hbp.py", "--config", "configs/demo_tiny.yaml",
        "--max-steps", str(steps), "--metrics-file", str(tmp_path / "metrics.jsonl"),
        "--set", f"data.sample_info={tmp_path / 'sample_info.npz'}",
        "--set", f"plan.path={tmp_path / 'plan'}",
        "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = proc.stdout
    assert "Plan report" in out and "| group | pack_length | cp |" in out
    assert "CP degrees [1, 2]" in out
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(steps))
    losses = [r["loss"] for r in recs]
    assert losses[0] > 10.0  # ~ln(32000) at init
    assert max(losses[-3:]) < losses[0] - 0.5, losses  # clearly falling (full demo: ~10.4 -> ~6)
    for r in recs:
        assert r["loss_tokens"] > 0 and r["tokens"] > 0 and r["group"] in (0, 1) and r["cp"] in (1, 2)
        assert len(r["attn_pairs_per_rank"]) == 2
    ck = tmp_path / "ckpt"
    assert (ck / "latest").read_text().strip() == f"step_{steps}"
    assert (ck / f"step_{steps}" / "rank_00000.pt").is_file() and (
        ck / f"step_{steps}" / "rank_00001.pt"
    ).is_file()
    assert (tmp_path / "plan" / "plan.npz").is_file() and (tmp_path / "sample_info.npz").is_file()
