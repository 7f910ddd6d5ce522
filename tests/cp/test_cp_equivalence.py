"""Issue 6, the central test: adaptive CP training equals single-process training.

A plan with groups {CP1, CP2, CP4} on 4 gloo processes (CP-1 steps: 4 replicas; CP-2: 2
replicas of 2 ranks; CP-4: one replica of 4 ranks) must give, step by step, the same loss,
the same reduced gradients and the same updated weights as ONE process running the same
steps with all of each step's micro-batches (the plan copied to world size 1 with every
group at CP 1), fp32, relative error ≤ 1e-5. The packs hold documents of odd length,
documents shorter than 2·c (greedy fill puts short samples into the long packs) and packs
holding a single document — checked on the plan itself below.

Both runs go through the trainer's public ``megatron_hbp.mcore.train.run`` (worker:
``tests/cp/test_cp_equivalence_worker.py``).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_hbp.configio import to_dict
from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "cp" / "test_cp_equivalence_worker.py"
WORLD = 4
TOL = 1e-5
pytestmark = pytest.mark.slow

WORDS = ["context", "parallel", "ranks", "share", "keys", "and", "values", "of", "every", "document",
         "while", "short", "samples", "skip", "the", "ring", "entirely", "so", "steps", "switch"]  # fmt: skip


# An answer of this many words is 505 tokens (padded to 512): its CP-4 pack has no room for any other
# sample, so the plan holds a single-document pack (checked in test_plan_covers_the_edge_cases).
WORDS_FILLING_512 = 494


def write_jsonl(path: Path, seed: int = 0) -> None:
    """Short (fit CP1 packs), medium (CP2 group) and long (CP4 group) chat samples."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 60) for _ in range(30)] + [rng.randint(110, 190) for _ in range(5)]
    sizes += [rng.randint(230, 380) for _ in range(3)] + [WORDS_FILLING_512]
    rng.shuffle(sizes)
    with open(path, "w") as f:
        for n in sizes:
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            a = " ".join(rng.choice(WORDS) for _ in range(n))
            f.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                )
            )
            f.write("\n")
        # Assistant-only one-word samples are 3-4 tokens with the mistral template: shorter than
        # 2c, and greedy fill drops them into the free space of the CP packs.
        for _ in range(6):
            f.write(json.dumps({"messages": [{"role": "assistant", "content": rng.choice(WORDS)}]}) + "\n")


def write_model_yaml(path: Path) -> None:
    """The tiny preset with a 10x larger init: at the default std (0.02) attention scores are
    ~0, so attention barely moves the loss and a wrong attention forward could hide in the
    rounding. With std 0.2 the scores are O(1) (checked: scaling the CP softmax by 1.0001
    then fails this test)."""
    from megatron_hbp.model_config import load_model_config

    tiny = to_dict(load_model_config("tiny"))
    tiny.update(name="tiny_sharp", init_method_std=0.2)
    path.write_text(yaml.safe_dump(tiny))


def single_process_copy(plan):
    """Same steps, same packs in the same order, world size 1, CP 1 and no recompute everywhere:
    the reference (so the CP run's per-group recompute is checked to change nothing as well)."""
    from megatron_hbp.planner import GroupConfig, Plan

    cfg = plan.config
    replicas = np.array([plan.world_size // g.cp for g in cfg.groups], dtype=np.int32)
    groups = [
        GroupConfig(pack_length=g.pack_length, cp=1, recompute_layers=0,
                    micro_batches=cfg.micro_batches(i) * int(replicas[i]))
        for i, g in enumerate(cfg.groups)
    ]  # fmt: skip
    arrays = dict(plan.arrays)
    arrays["step_micro_batches"] = (arrays["step_micro_batches"] * replicas[arrays["step_group"]]).astype(
        np.int32
    )
    one = replace(cfg, world_size=1, groups=groups, micro_batches_per_step=None, tokens_per_step=None)
    return Plan(
        config=one, arrays=arrays, num_samples=plan.num_samples, fingerprint=plan.fingerprint,
        lengths_sha256=plan.lengths_sha256,
    )  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from megatron_hbp.data import load_sample_info, preprocess
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    w = tmp_path_factory.mktemp("cp_equiv")
    write_model_yaml(w / "model.yaml")
    write_jsonl(w / "data.jsonl")
    preprocess(w / "data.jsonl", w / "info.npz", template="mistral", progress=False)
    info = load_sample_info(w / "info.npz")
    cfg = PlanConfig(
        groups=[
            GroupConfig(pack_length=128, cp=1),
            GroupConfig(pack_length=256, cp=2, recompute_layers=1),
            GroupConfig(pack_length=512, cp=4, recompute_layers=2),
        ],
        world_size=WORLD,
        micro_batches_per_step=1,
        seed=0,
    )
    plan = build_plan(info.lengths, info.loss_tokens, cfg, fingerprint=info.fingerprint)
    plan.save(w / "plan_cp.npz")
    single_process_copy(plan).save(w / "plan_single.npz")
    # TP = 2 next to CP: 4 processes = 2 (TP) x 2 (DP x CP), groups {CP1, CP2}.
    cfg_tp = replace(cfg, groups=cfg.groups[:2], world_size=WORLD // 2)
    plan_tp = build_plan(info.lengths, info.loss_tokens, cfg_tp, fingerprint=info.fingerprint)
    plan_tp.save(w / "plan_tp2.npz")
    single_process_copy(plan_tp).save(w / "plan_tp2_single.npz")
    run_ranks(1, WORKER, [w, "plan_single.npz:single:1", "plan_tp2_single.npz:tp_single:1"], timeout=600)
    run_ranks(
        WORLD,
        WORKER,
        [w, "plan_cp.npz:cp:1:ulysses", "plan_cp.npz:cp_ag:1:allgather", "plan_tp2.npz:tp2:2"],
        timeout=900,
    )
    return w


def _rel(a, b) -> float:
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_plan_covers_the_edge_cases(work):
    """Guard of the fixture: CP 1/2/4 steps, odd lengths, docs shorter than 2c, single-doc packs."""
    from megatron_hbp import load_plan

    plan = load_plan(work / "plan_cp.npz")
    cps = [plan.step(s).cp for s in range(plan.num_steps)]
    assert {1, 2, 4} <= set(cps), cps
    odd = short = single = 0
    for s in range(plan.num_steps):
        st = plan.step(s)
        for rep in st.replicas:
            for mb in rep.micro_batches:
                for p in mb.packs:
                    odd += int((p.lengths % 2 == 1).sum())
                    if st.cp > 1:
                        short += int((p.lengths < 2 * st.cp).sum())
                    single += int(len(p) == 1)
    assert odd > 0 and short > 0 and single > 0, (odd, short, single)
    print(
        f"plan: {plan.num_steps} steps, cp per step {cps}, odd docs {odd}, docs < 2c {short}, single-doc packs {single}"
    )


@pytest.mark.parametrize("run", ["cp", "cp_ag"])
def test_same_loss_every_step(work, run):
    single = json.loads((work / "single.json").read_text())
    cp = json.loads((work / f"{run}.json").read_text())
    assert [r["step"] for r in cp] == [r["step"] for r in single]
    assert sorted({r["cp"] for r in cp}) == [1, 2, 4]  # the log shows the switch
    assert {r["cp_backend"] for r in cp if r["cp"] > 1} == {"ulysses" if run == "cp" else "allgather"}
    assert {r["cp"] for r in single} == {1}
    for a, b in zip(cp, single):
        assert a["loss_tokens"] == b["loss_tokens"]
        assert a["lr"] > 0 and a["lr"] == b["lr"]  # the learning rate applied at this step
        assert _rel(a["loss"], b["loss"]) <= TOL, (a["step"], a["cp"], a["loss"], b["loss"])
    print(
        f"loss rel err per step ({run}):",
        [(a["cp"], f"{_rel(a['loss'], b['loss']):.1e}") for a, b in zip(cp, single)],
    )


@pytest.mark.parametrize("run", ["cp", "cp_ag"])
def test_same_gradients_and_weights_every_step(work, run):
    import torch

    single = torch.load(work / "single_rank0.pt")["steps"]
    cp = torch.load(work / f"{run}_rank0.pt")["steps"]
    recs = {r["step"]: r["cp"] for r in json.loads((work / f"{run}.json").read_text())}
    assert single.keys() == cp.keys() and len(cp) >= 3
    worst = {}
    for s in sorted(cp):
        for name, g in single[s]["grads"].items():
            e_g = _rel(cp[s]["grads"][name], g)
            e_w = _rel(cp[s]["weights_before"][name], single[s]["weights_before"][name])
            worst[(s, recs[s], name)] = (e_g, e_w)
            assert e_g <= TOL, (s, recs[s], name, e_g)
            assert e_w <= TOL, (s, recs[s], name, e_w)
    for c in (1, 2, 4):
        errs = [v for k, v in worst.items() if k[1] == c]
        print(
            f"{run} cp {c}: max grad rel err {max(e[0] for e in errs):.1e}, "
            f"max weight rel err {max(e[1] for e in errs):.1e}"
        )
    # Weights really moved between every two compared steps (not frozen tensors, lr > 0 throughout).
    steps = sorted(cp)
    for s0, s1 in zip(steps, steps[1:]):
        moved = max(_rel(cp[s1]["weights_before"][n], cp[s0]["weights_before"][n]) for n in cp[s0]["grads"])
        assert moved > 1e-5, (s0, s1, moved)


def test_ulysses_equals_allgather(work):
    import torch

    a = json.loads((work / "cp.json").read_text())
    b = json.loads((work / "cp_ag.json").read_text())
    for x, y in zip(a, b):
        assert _rel(x["loss"], y["loss"]) <= TOL, (x["step"], x["cp"])
    ga, gb = torch.load(work / "cp_rank0.pt")["steps"], torch.load(work / "cp_ag_rank0.pt")["steps"]
    for s in ga:
        for name, g in ga[s]["grads"].items():
            assert _rel(g, gb[s]["grads"][name]) <= TOL, (s, name)
            assert _rel(ga[s]["weights_before"][name], gb[s]["weights_before"][name]) <= TOL, (s, name)


def tp_shard(name: str, full, tp: int, r: int):
    """Rank ``r``'s tensor-parallel shard of a full (TP = 1) parameter, Megatron's layouts."""
    if "linear_fc1" in name:  # SwiGLU: [gate; up], each split across TP ranks
        gate, up = full.chunk(2, 0)
        return __import__("torch").cat([gate.chunk(tp, 0)[r], up.chunk(tp, 0)[r]])
    if "linear_qkv.weight" in name or "word_embeddings" in name or "output_layer" in name:
        return full.chunk(tp, 0)[r]  # column / vocab parallel (qkv rows are grouped per KV head)
    if "linear_proj.weight" in name or "linear_fc2.weight" in name:
        return full.chunk(tp, 1)[r]  # row parallel
    return full  # norms: replicated


def test_tensor_parallel_with_cp(work):
    import torch

    single = json.loads((work / "tp_single.json").read_text())
    tp2 = json.loads((work / "tp2.json").read_text())
    assert sorted({r["cp"] for r in tp2}) == [1, 2]
    assert [r["step"] for r in tp2] == [r["step"] for r in single]
    for a, b in zip(tp2, single):
        assert _rel(a["loss"], b["loss"]) <= TOL, (a["step"], a["cp"])
    ref = torch.load(work / "tp_single_rank0.pt")["steps"]
    for r in range(2):
        got = torch.load(work / f"tp2_rank{r}.pt")["steps"]
        assert got.keys() == ref.keys()
        for s in got:
            assert got[s]["grads"].keys() == ref[s]["grads"].keys()
            for name, g in got[s]["grads"].items():
                want = tp_shard(name, ref[s]["grads"][name], 2, r)
                assert g.shape == want.shape, (name, g.shape, want.shape)
                assert _rel(g, want) <= TOL, (s, r, name, _rel(g, want))
                w = tp_shard(name, ref[s]["weights_before"][name], 2, r)
                assert _rel(got[s]["weights_before"][name], w) <= TOL, (s, r, name)
