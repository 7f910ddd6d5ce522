"""Training on gloo: stable-loss equality, exact resume, TP = 2, bad inputs (issue 5 acceptance).

One module fixture prepares a small chat dataset, its sample info and plans, then launches
``tests/mcore/test_train_worker.py`` twice with ``tests.distributed.run_ranks`` (1 process; 2 processes
running several scenarios) and the tests read the JSON / tensors they leave.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "mcore" / "test_train_worker.py"
pytestmark = pytest.mark.slow

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "packing",
    "long",
    "sequences",
    "into",
    "balanced",
    "batches",
]


def write_chat_jsonl(path: Path, n: int, seed: int = 0, extra_words: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120) + extra_words))
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                )
            )
            f.write("\n")


def one_rank_copy(plan, path: Path) -> None:
    """The same steps and packs as a 2-rank plan, for 1 rank: each step runs all packs."""
    from megatron_hbp.planner import Plan

    arrays = dict(plan.arrays)
    arrays["step_micro_batches"] = arrays["step_micro_batches"] * plan.world_size
    cfg = replace(
        plan.config, world_size=1, micro_batches_per_step=plan.config.micro_batches_per_step * plan.world_size
    )
    Plan(
        config=cfg, arrays=arrays, num_samples=plan.num_samples, fingerprint=plan.fingerprint,
        lengths_sha256=plan.lengths_sha256,
    ).save(path)  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_hbp.data import load_sample_info, preprocess
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    w = tmp_path_factory.mktemp("train")
    write_chat_jsonl(w / "data.jsonl", 48)
    preprocess(w / "data.jsonl", w / "info.npz", template="llama3", progress=False)
    info = load_sample_info(w / "info.npz")
    # the same sample info without token files: the trainer's JSONL path (same fingerprint)
    preprocess(w / "data.jsonl", w / "info_jsonl.npz", template="llama3", progress=False, tokens=False)
    cfg = PlanConfig(groups=[GroupConfig(pack_length=256)], world_size=2, micro_batches_per_step=2, seed=0)
    plan = build_plan(info.lengths, info.loss_tokens, cfg, fingerprint=info.fingerprint)
    plan.save(w / "plan_w2.npz")
    one_rank_copy(plan, w / "plan_w1.npz")
    # a plan whose step 0 claims one loss token more than its samples hold (Megatron's denominator check)
    from megatron_hbp.planner import Plan

    bad_loss = dict(plan.arrays, step_loss_tokens=plan.arrays["step_loss_tokens"].copy())
    bad_loss["step_loss_tokens"][0] += 1
    Plan(
        config=plan.config, arrays=bad_loss, num_samples=plan.num_samples, fingerprint=plan.fingerprint,
        lengths_sha256=plan.lengths_sha256,
    ).save(w / "plan_w2_bad_loss.npz")  # fmt: skip
    rcfg = replace(cfg, micro_batches_per_step=1)
    rplan = build_plan(info.lengths, info.loss_tokens, rcfg, fingerprint=info.fingerprint)
    assert rplan.num_steps >= 10, rplan.num_steps
    rplan.save(w / "plan_resume.npz")

    # bad inputs: a sample info whose data file is gone; a data file edited after preprocessing
    (w / "bad_missing").mkdir()
    write_chat_jsonl(w / "bad_missing" / "data.jsonl", 48)
    preprocess(
        w / "bad_missing" / "data.jsonl",
        w / "bad_missing" / "info.npz",
        template="llama3",
        progress=False,
        tokens=False,  # the JSONL path: token files would make the data file unneeded
    )
    (w / "bad_missing" / "data.jsonl").unlink()
    (w / "bad_changed").mkdir()
    write_chat_jsonl(w / "bad_changed" / "data.jsonl", 48)
    preprocess(
        w / "bad_changed" / "data.jsonl",
        w / "bad_changed" / "info.npz",
        template="llama3",
        progress=False,
        tokens=False,  # the JSONL path: token files would make the data file unneeded
    )
    binfo = load_sample_info(w / "bad_changed" / "info.npz")
    build_plan(binfo.lengths, binfo.loss_tokens, cfg, fingerprint=binfo.fingerprint).save(
        w / "bad_changed" / "plan.npz"
    )
    write_chat_jsonl(w / "bad_changed" / "data.jsonl", 48, extra_words=7)  # same lines, longer answers
    # plans from bare lengths (no fingerprint) that are not this sample info's: fewer samples; same
    # count but other lengths (an answer one token longer)
    build_plan(info.lengths[:40], info.loss_tokens[:40], cfg).save(w / "plan_lengths_fewer.npz")
    other = info.lengths.copy()
    other[3] += 1
    build_plan(other, info.loss_tokens, cfg).save(w / "plan_lengths_other.npz")

    run_ranks(1, WORKER, [w, "single", "rerun", "token_files"], timeout=600)
    run_ranks(2, WORKER, [w, "stable2", "resume", "resume_distopt", "tp2", "bad"], timeout=900)
    return w


def _result(work: Path, name: str) -> dict:
    r = json.loads((work / f"result_{name}.json").read_text())
    assert "error" not in r, r.get("traceback", r["error"])
    return r


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_stable_loss_is_global_token_mean(work):
    single = _result(work, "single")
    # independent computation: plain logits + F.cross_entropy / the plan's loss tokens
    assert _rel(single["losses"][0], single["manual"]["step_token_mean"]) <= 1e-5
    assert single["records"][0]["loss_tokens"] > 0


def test_model_document_isolation(work):
    iso = _result(work, "single")["manual"]["isolation"]
    assert iso["others_equal"] and iso["doc1_changed"]
    assert iso["alone_max_abs_diff"] < 1e-4  # a document's logits do not depend on its place in the pack


def test_loss_normalization_options(work):
    single = _result(work, "single")
    for mode in ("sample_mean", "micro_batch_mean"):
        assert _rel(single["other_modes"][mode], single["manual"][mode]) <= 1e-5, mode
    # the three normalisations genuinely differ on this data
    vals = [single["manual"][m] for m in ("step_token_mean", "sample_mean", "micro_batch_mean")]
    assert len({round(v, 6) for v in vals}) == 3


def test_same_loss_and_grads_1x4_vs_2x2(work):
    import torch

    single, two = _result(work, "single"), _result(work, "stable2")
    assert len(two["losses"]) == len(single["losses"]) == 2
    for a, b in zip(two["losses"], single["losses"]):
        assert _rel(a, b) <= 1e-5
    g1 = torch.load(work / "grads_single.pt")
    g2 = torch.load(work / "grads_stable2.pt")
    for step in (0, 1):
        assert g1[step].keys() == g2[step].keys() and len(g1[step]) > 0
        for name in g1[step]:
            a, b = g2[step][name], g1[step][name]
            scale = b.abs().max().item()
            assert scale > 0, name
            assert (a - b).abs().max().item() / scale <= 1e-5, (step, name)


def test_fused_loss_kernel_matches_megatron_ce(work):
    import torch

    single = _result(work, "single")
    assert len(single["losses_fused"]) == len(single["losses"]) == 2
    for a, b in zip(single["losses_fused"], single["losses"]):
        assert _rel(a, b) <= 1e-5
    g1, gf = torch.load(work / "grads_single.pt"), torch.load(work / "grads_fused.pt")
    for step in (0, 1):
        assert g1[step].keys() == gf[step].keys() and len(g1[step]) > 0
        for name in g1[step]:
            scale = g1[step][name].abs().max().item()
            assert (gf[step][name] - g1[step][name]).abs().max().item() / scale <= 1e-5, (step, name)


def test_resume_is_bitwise_exact(work):
    r = _result(work, "resume")
    assert len(r["straight"]) == 10 and len(r["first"]) == 5
    assert r["second_steps"] == [5, 6, 7, 8, 9]
    assert r["first"] == r["straight"][:5]
    assert r["second"] == r["straight"][5:]  # bitwise: exact float equality
    assert r["grad_norms_second"] == r["grad_norms_straight"][5:]
    assert (work / "ckpt_resume" / "step_5" / "rank_00000.pt").is_file()
    assert (work / "ckpt_resume" / "step_10" / "meta.json").is_file()
    lines = (work / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [5, 6, 7, 8, 9]


def test_resume_is_bitwise_exact_with_distributed_optimizer(work):
    r = _result(work, "resume_distopt")
    assert len(r["straight"]) == 4 and len(r["second"]) == 2
    assert r["second"] == r["straight"][2:]
    # the default checkpoint format: Megatron torch_dist (model + sharded optimizer state in dist/)
    assert (work / "ckpt_distopt" / "step_2" / "dist" / ".metadata").is_file()
    assert (
        json.loads((work / "ckpt_distopt" / "step_2" / "meta.json").read_text())["checkpoint_format"]
        == "torch_dist"
    )


def test_tensor_parallel_2_matches_single(work):
    single, tp2 = _result(work, "single"), _result(work, "tp2")
    ref_losses = single["losses"]
    ref_norms = [r["grad_norm"] for r in single["records"]]
    for key, ref in (("losses", ref_losses), ("grad_norms", ref_norms), ("losses_fused", ref_losses),
                     ("grad_norms_fused", ref_norms)):  # fmt: skip
        got = tp2[key]
        assert len(got) == len(ref) == 2, key
        errs = [_rel(a, b) for a, b in zip(got, ref)]
        assert max(errs) <= 1e-5, (key, errs)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("world_size", "data x context ranks but this launch has 2"),
        ("missing_file", "does not exist"),
        ("changed_data", "changed"),
        ("unknown_preset", "unknown model preset 'no_such_model'"),
        ("oom", "out-of-memory risk: group 0 (pack_length="),
        ("no_sample_info", "sample info file not found"),
        ("checkpoint_other_plan", "was saved with a different plan"),
        ("lengths_plan_fewer_samples", "plan was built for 40 samples"),
        ("lengths_plan_other_lengths", "got 48 samples with digest"),
    ],
)
def test_bad_input_fails_before_training(work, case, needle):
    r = _result(work, "bad")[case]
    assert r["raised"], case
    assert r["type"] == "TrainSetupError", r
    assert needle in r["message"], r["message"]


def test_loss_denominator_differing_from_the_plan_stops_the_run(work):
    """Megatron's all-reduced loss denominator is checked against the plan's every step (no extra
    collective): a plan claiming one loss token more fails on both ranks with one line naming step and rank."""
    r = _result(work, "bad")["plan_loss_tokens"]
    assert r["raised"] and r["type"] == "RuntimeError", r
    want = "plan step 0, rank 0: Megatron's all-reduced loss denominator "
    assert r["message"].startswith(want) and "\n" not in r["message"], r["message"]
    assert "differs from the plan's" in r["message"] and "(step_token_mean)" in r["message"], r["message"]


def test_token_files_and_jsonl_train_bitwise_equal(work):
    """Training from the token files (mmap) and from the JSONL gives bitwise the same run."""
    r = _result(work, "token_files")
    assert r["token_files"] == [True, False]  # info.npz has token files, info_jsonl.npz has none
    assert len(r["losses_tokens"]) == 2 and r["losses_tokens"] == r["losses_jsonl"], r
    assert r["grads_compared"] > 10 and r["grads_equal"], r


def test_plan_copy_is_same_packs(work):
    """Guard of the fixture itself: the 1-rank plan holds exactly the 2-rank plan's packs."""
    from megatron_hbp import load_plan

    p1, p2 = load_plan(work / "plan_w1.npz"), load_plan(work / "plan_w2.npz")
    assert p1.num_steps == p2.num_steps
    s1, s2 = p1.step(0), p2.step(0)
    a = [tuple(p.sample_indices) for mb in s1.replicas[0].micro_batches for p in mb.packs]
    b = [tuple(p.sample_indices) for r in s2.replicas for mb in r.micro_batches for p in mb.packs]
    assert a == b and len(a) == 4
    assert s1.loss_tokens == s2.loss_tokens


def test_second_run_frees_the_first_runs_model(work):
    """run() collects an earlier run's model before allocating (a GPU benchmark that trained
    three times in one process ran out of memory without this): with the automatic collector
    off, the first model is uncollected garbage after the first run and gone after the second."""
    r = _result(work, "rerun")
    assert r["after_first"] == 1  # cyclic garbage: still there without a collection
    assert r["after_second"] == 1  # the first one was freed by the second run(), its own remains
    assert r["after_collect"] == 0
