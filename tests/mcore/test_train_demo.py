"""The README demo command end to end, on a fresh output folder (2 CPU processes, gloo).

Same command and config as the README (``configs/demo_tiny.yaml``), outputs redirected to a
temporary folder and just enough steps to reach the plan's first CP-2 step (the full demo runs
40): it builds the sample info of the embedded demo data and the two-group plan (CP 1 / CP 2
with one recomputed layer), trains, prints the plan report, a falling loss and the switch to
CP 2 in its log, and leaves metrics and a checkpoint.
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _predicted_plan(tmp_path: Path):
    """The plan the trainer will build, built here independently with the public API (~4 s)."""
    from megatron_hbp import data as hdata
    from megatron_hbp.configio import from_dict
    from megatron_hbp.data.demo import ensure_demo_data
    from megatron_hbp.planner import PlanConfig, build_plan

    info_path = tmp_path / "predicted_info.npz"
    hdata.preprocess(
        [str(ensure_demo_data())], info_path, tokenizer=str(hdata.default_tokenizer_path()),
        template="plain", progress=False,
    )  # fmt: skip
    info = hdata.load_sample_info(info_path)
    pcfg = from_dict(PlanConfig, yaml.safe_load((ROOT / "configs" / "plan_demo.yaml").read_text()))
    return build_plan(info.lengths, info.loss_tokens, pcfg, fingerprint=info.fingerprint)


def test_demo_end_to_end(tmp_path):
    from megatron_hbp import load_plan

    predicted = _predicted_plan(tmp_path)
    cp_of_step = [predicted.groups[g].cp for g in predicted.arrays["step_group"]]
    first_cp2 = cp_of_step.index(2)  # 21 with configs/plan_demo.yaml (curriculum: short group first)
    steps = first_cp2 + 1
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "examples/pretrain_llama_hbp.py", "--config", "configs/demo_tiny.yaml",
        "--max-steps", str(steps), "--metrics-file", str(tmp_path / "metrics.jsonl"),
        "--set", f"data.sample_info={tmp_path / 'sample_info.npz'}",
        "--set", "data.build_if_missing=true",  # build the demo data there on purpose (not a typo)
        "--set", f"plan.path={tmp_path / 'plan'}",
        "--set", f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]  # fmt: skip
    proc = run_command(cmd, timeout=600)  # tests/distributed.py: OMP_NUM_THREADS=1, warnings off
    out = proc.stdout
    assert "Plan report" in out and "| group | pack_length | cp |" in out
    assert "CP degrees [1, 2]" in out
    # the trainer built the token files with the sample info and reads them (no tokenizer)
    assert f"[hbp] samples from {tmp_path / 'sample_info.tokens.bin'} (mmap)" in out, out[-3000:]
    # the trainer built the same plan as predicted, so first_cp2 is its first CP-2 step
    built = load_plan(tmp_path / "plan")
    assert np.array_equal(built.arrays["step_group"], predicted.arrays["step_group"])

    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(steps))
    assert {r["cp"] for r in recs} == {1, 2}
    for r in recs:
        assert r["loss_tokens"] > 0 and r["tokens"] > 0 and r["group"] in (0, 1)
        assert len(r["attn_pairs_per_rank"]) == 2
        if r["cp"] == 1:
            assert r["group"] == 0 and r["recompute_layers"] == 0 and r["cp_comm_bytes_per_rank"] == 0, r
        else:
            assert r["step"] == first_cp2 and r["group"] == 1, r
            assert r["recompute_layers"] == 1 and r["cp_comm_bytes_per_rank"] > 0, r
    # the switch is visible in the console log
    line = next(x for x in out.splitlines() if re.match(rf"step\s+{first_cp2} \|", x))
    assert "cp 2 |" in line and "cp_comm" in line and "recompute 1" in line, line

    losses = [r["loss"] for r in recs if r["cp"] == 1]
    assert losses[0] > 10.0  # ~ln(32000) at init
    assert max(losses[-3:]) < losses[0] - 0.5, losses  # clearly falling (full demo: ~10.4 -> ~6)
    ck = tmp_path / "ckpt"
    assert (ck / "latest").read_text().strip() == f"step_{steps}"
    for rank in (0, 1):
        assert (ck / f"step_{steps}" / f"rank_0000{rank}.pt").is_file()
    assert (tmp_path / "plan" / "plan.npz").is_file() and (tmp_path / "sample_info.npz").is_file()
