"""Simulator: step times against hand-computed cases; Megatron dynamic-CP port against upstream.

Uses the "mini" model and the round-number GPU of test_costmodel (1 us of GEMMs per token,
ATTN_S_PER_PAIR seconds per causal pair, 0.1 ms weight streaming floor, 1 GB/s links, no
overlap): every expected time below is written out from those constants.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from megatron_hbp.costmodel import (
    CostModel,
    default_strategies,
    run_strategies,
    simulate_dynamic_cp,
    simulate_plan,
)
from megatron_hbp.costmodel.dynamic_cp import BalancedCPScheduler, schedule_step
from megatron_hbp.costmodel.simulate import format_table, global_batches
from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan
from megatron_hbp.planner.plan import ARRAY_KEYS, Plan
from tests.costmodel.test_costmodel import ATTN_S_PER_PAIR, N_MINI, unit_model

DP_S = 0.5 * N_MINI * 6 / 1e9  # 2 GPUs, distributed optimizer, 1 GB/s
OPT_S = 32 * N_MINI / 2 / 26.4576e9


def tri(n):
    return n * (n + 1) // 2


def hand_plan(world_size, groups, steps):
    """A Plan from explicit steps: ``steps = [(group, micro_batches, [pack docs, ...])]`` where packs are
    listed replica-major (replica r, micro-batch k = pack r*m + k)."""
    lengths, poff, spo, sg, smb = [], [0], [0], [], []
    for g, m, packs in steps:
        for docs in packs:
            lengths += docs
            poff.append(len(lengths))
        spo.append(len(poff) - 1)
        sg.append(g)
        smb.append(m)
    lengths = np.array(lengths, dtype=np.int32)
    n_pack, n_step = len(poff) - 1, len(sg)
    arrays = {
        "samples": np.arange(len(lengths), dtype=np.int64),
        "lengths": lengths,
        "pack_offsets": np.array(poff, dtype=np.int64),
        "pack_loss_tokens": np.array(
            [int(lengths[a:b].sum()) for a, b in zip(poff[:-1], poff[1:])], dtype=np.int64
        ),
        "step_pack_offsets": np.array(spo, dtype=np.int64),
        "step_group": np.array(sg, dtype=np.int32),
        "step_micro_batches": np.array(smb, dtype=np.int32),
        "step_epoch": np.zeros(n_step, dtype=np.int32),
        "step_loss_tokens": np.zeros(n_step, dtype=np.int64),
        "dropped_indices": np.zeros(0, dtype=np.int64),
        "dropped_reasons": np.zeros(0, dtype=np.int8),
        "dropped_epochs": np.zeros(0, dtype=np.int32),
    }
    assert set(arrays) == set(ARRAY_KEYS) and n_pack == poff.__len__() - 1
    cfg = PlanConfig(groups=groups, world_size=world_size, micro_batches_per_step=1)
    sha = hashlib.sha256(lengths.astype("<i4").tobytes()).hexdigest()
    return Plan(config=cfg, arrays=arrays, num_samples=len(lengths), fingerprint=None, lengths_sha256=sha)


def t_cp1(docs):
    """Hand formula of one CP=1 micro-batch on the unit GPU (compute bound above 100 tokens)."""
    tokens = sum(docs)
    return max(tokens * 1e-6, 1e-4) + sum(tri(d) for d in docs) * ATTN_S_PER_PAIR


def test_simulate_plan_hand_case_cp1():
    cm = unit_model(num_gpus=2)
    groups = [GroupConfig(pack_length=2048, cp=1, recompute_layers=0)]
    # step 0: replica 0 runs [1000, 600], replica 1 runs [2000]; step 1: [300] vs [500, 500]
    plan = hand_plan(2, groups, [(0, 1, [[1000, 600], [2000]]), (0, 1, [[300], [500, 500]])])
    res = simulate_plan(plan, cm)
    step0 = max(t_cp1([1000, 600]), t_cp1([2000])) + DP_S + OPT_S
    step1 = max(t_cp1([300]), t_cp1([500, 500])) + DP_S + OPT_S
    np.testing.assert_allclose(res.step_times, [step0, step1], rtol=1e-12)
    assert res.gpu_hours == pytest.approx((step0 + step1) * 2 / 3600)
    # a perfect balancer would spread each step's work evenly over the 2 replicas
    balanced = (t_cp1([1000, 600]) + t_cp1([2000])) / 2 + (t_cp1([300]) + t_cp1([500, 500])) / 2
    assert res.extra["balanced_s"] == pytest.approx(balanced, rel=1e-12)
    # metrics (HBP.md section 2): step 0 tokens 1600 vs 2000 -> DBR = 400 / (2000*2) = 0.1;
    # step 1: 300 vs 1000 -> 700 / 2000 = 0.35; mean 0.225
    assert res.dbr == pytest.approx(0.225)
    # ABR step 0: A = 1000^2 + 600^2 = 1.36e6 vs 4e6 -> (4e6 - 1.36e6) / 8e6 = 0.33;
    # step 1: 9e4 vs 5e5 -> 4.1e5 / 1e6 = 0.41; mean 0.37
    assert res.abr == pytest.approx(0.37)
    assert res.cr == 0.0


def test_simulate_plan_hand_case_two_micro_batches_and_cp2():
    cm = unit_model(num_gpus=2)
    groups = [GroupConfig(pack_length=1024, cp=1), GroupConfig(pack_length=4096, cp=2)]
    plan = hand_plan(
        2,
        groups,
        [
            (
                0,
                2,
                [[400], [600], [1000], [200]],
            ),  # replica 0: [400] then [600]; replica 1: [1000] then [200]
            (1, 1, [[1500]]),  # one replica of 2 GPUs
        ],
    )
    res = simulate_plan(plan, cm)
    step0 = max(t_cp1([400]) + t_cp1([600]), t_cp1([1000]) + t_cp1([200])) + DP_S + OPT_S
    # 1500 on CP 2: 750 tokens per rank, 562875 pairs per rank, 576000 B of K/V at 1 GB/s
    step1 = 7.5e-4 + 562875 * ATTN_S_PER_PAIR + 5.76e-4 + DP_S + OPT_S
    np.testing.assert_allclose(res.step_times, [step0, step1], rtol=1e-12)
    assert res.cr == pytest.approx(1500 / (1500 + 2200))
    assert res.cp_comm_s == pytest.approx(5.76e-4)


def test_simulate_plan_world_size_mismatch():
    plan = hand_plan(4, [GroupConfig(pack_length=2048)], [(0, 1, [[10], [10], [10], [10]])])
    with pytest.raises(ValueError, match="world_size=4 but the cluster has 2"):
        simulate_plan(plan, unit_model(num_gpus=2))


def test_simulate_plan_matches_object_api_on_a_real_plan():
    """The vectorised path against a per-step loop over the planner's object view."""
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=8)
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(16, 3000, 3000), rng.integers(9000, 60000, 12)]).astype(np.int32)
    cfg = PlanConfig(
        groups=[
            GroupConfig(pack_length=8192, cp=1, recompute_layers=4),
            GroupConfig(pack_length=65536, cp=8),
        ],
        world_size=8,
        micro_batches_per_step=2,
        balance="sort",
        last_step="pad",
    )
    plan = build_plan(lengths, None, cfg)
    res = simulate_plan(plan, cm)
    expected = []
    for step in plan:
        reps = []
        for rep in step.replicas:
            t = 0.0
            for mb in rep.micro_batches:
                for pack in mb.packs:
                    from megatron_hbp.costmodel import zigzag_attention_pairs

                    pairs = zigzag_attention_pairs(pack.lengths, np.array([0, len(pack.lengths)]), step.cp)
                    t += cm.microbatch_time(
                        [pack.padded_lengths.sum()], pairs, step.cp, step.recompute_layers
                    )[0]
            reps.append(t)
        expected.append(max(reps))
    dp = res.step_times - np.array(expected)
    assert np.all(dp >= cm.optimizer_time() - 1e-12)
    np.testing.assert_allclose(dp, cm.optimizer_time(), atol=1e-9)  # DP reduction fully hidden on one node


def test_dynamic_cp_hand_case():
    """2 GPUs, max_seqlen_per_rank 1000, samples [1500, 400, 300] (worked through Megatron's code):
    group 1 = the 1500 sample on both GPUs (CP 2: 1500 needs 2**ceil(log2 1.5) = 2 GPUs; no free GPU
    is left for the CP-1 bucket, so the group closes); group 2 = 400 on GPU 0 and 300 on GPU 1."""
    groups = schedule_step([1500, 400, 300], 1000, 2)
    assert groups == [[[(0, 2)], [(0, 2)]], [[(1, 1)], [(2, 1)]]]
    cm = unit_model(num_gpus=2)
    res = simulate_dynamic_cp(
        np.array([1500, 400, 300]), cm, tokens_per_step=10_000, max_seqlen_per_rank=1000
    )
    step = (7.5e-4 + 562875 * ATTN_S_PER_PAIR + 5.76e-4) + t_cp1([400]) + DP_S + OPT_S
    np.testing.assert_allclose(res.step_times, [step], rtol=1e-12)
    assert res.cr == pytest.approx(1500 / 2200)
    g1 = 7.5e-4 + 562875 * ATTN_S_PER_PAIR + 5.76e-4  # both GPUs busy with the CP-2 sample
    assert res.extra["balanced_s"] == pytest.approx(g1 + (t_cp1([400]) + t_cp1([300])) / 2, rel=1e-12)
    # per GPU tokens: 750 + 400 vs 750 + 300 -> DBR = 100 / (1150 * 2)
    assert res.dbr == pytest.approx(100 / 2300)
    packed = simulate_dynamic_cp(
        np.array([1500, 400, 300]), cm, tokens_per_step=10_000, max_seqlen_per_rank=1000, pack_subsamples=True
    )
    np.testing.assert_allclose(packed.step_times, res.step_times, rtol=1e-12)  # one CP-1 sample per GPU


def test_packing_subsamples_only_removes_exposed_dp_time():
    """2 GPUs, DP reduction overlapped with one (mean) micro-batch: samples [100] x 4 at 1000 tokens per
    rank -> one group, GPU 0 runs samples 0, 2 and GPU 1 samples 1, 3 (Megatron's scheduler).
    Unpacked: 4 micro-batches of t1 = t_cp1([100]) each, mean t1, exposed DP_S - t1. Packed: one
    micro-batch per GPU of t2 = t_cp1([100, 100]), mean t2 >= t1, exposed DP_S - t2 (the old
    accounting gave the packed records 0 s and exposed all of DP_S)."""
    assert schedule_step([100] * 4, 1000, 2) == [[[(0, 1), (2, 1)], [(1, 1), (3, 1)]]]
    cm = unit_model(num_gpus=2, overlap_dp_comm=True)
    kw = dict(tokens_per_step=10_000, max_seqlen_per_rank=1000, recompute_layers=0)
    unpacked = simulate_dynamic_cp(np.array([100] * 4), cm, **kw)
    packed = simulate_dynamic_cp(np.array([100] * 4), cm, pack_subsamples=True, **kw)
    t1, t2 = t_cp1([100]), t_cp1([100, 100])
    assert t1 == pytest.approx(1e-4 + 5050 * ATTN_S_PER_PAIR) and t2 == pytest.approx(
        2e-4 + 10100 * ATTN_S_PER_PAIR
    )
    assert t2 < DP_S  # the reduction is longer than either micro-batch: both expose part of it
    np.testing.assert_allclose(unpacked.step_times, [2 * t1 + (DP_S - t1) + OPT_S], rtol=1e-12)
    np.testing.assert_allclose(packed.step_times, [t2 + (DP_S - t2) + OPT_S], rtol=1e-12)
    assert packed.dp_comm_s == pytest.approx(DP_S - t2 + OPT_S)
    assert unpacked.dp_comm_s == pytest.approx(DP_S - t1 + OPT_S)
    assert packed.dp_comm_s < unpacked.dp_comm_s
    assert (
        packed.extra["micro_batches_per_gpu_step"] == 1 and unpacked.extra["micro_batches_per_gpu_step"] == 2
    )


def test_dynamic_cp_too_long_sample():
    with pytest.raises(ValueError, match="raise max_seqlen_per_rank"):
        schedule_step([5000], 1000, 2)


def test_global_batches_cover_every_sample_once():
    lengths = np.random.default_rng(0).integers(1, 100, 1000)
    batches = global_batches(lengths, 2000, seed=1)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(1000))
    sums = [lengths[b].sum() for b in batches]
    assert max(sums[:-1]) <= 2000 and min(sums[:-1]) > 2000 - 100


class _Group:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


@pytest.mark.slow
def test_dynamic_cp_port_equals_megatron_upstream():
    """Our torch-free BalancedCPScheduler gives exactly megatron-core 0.19.2's schedules."""
    pytest.importorskip("torch")
    upstream = pytest.importorskip("megatron.core.pipeline_parallel.hybrid_cp_schedule")
    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(30):
        world = int(rng.choice([2, 4, 8, 16, 32]))
        msl = int(rng.choice([1024, 4096, 16384]))
        n = int(rng.integers(1, 120))
        lengths = np.clip(np.exp(rng.normal(np.log(msl / 8), 1.5, n)), 1, msl * world).astype(int)
        items = [(i, int(x)) for i, x in enumerate(lengths)]
        try:
            want = upstream.BalancedCPScheduler(msl, _Group(world)).get_groups_and_subsamples(items, None)
        except (AssertionError, RuntimeError, IndexError):
            continue
        got = BalancedCPScheduler(msl, world).get_groups_and_subsamples(items)
        assert got == want
        compared += 1
    assert compared >= 20


@pytest.mark.slow
def test_paper_direction_on_tulu3_longcite_subsample():
    """Issue 7 acceptance on a 5 % subsample (the tool runs the full 1M): ISF -> HBP groups -> HBP
    balanced gets faster, as in the paper's Table 6 (1.0x, 1.2x, 1.4x), with ABR falling and
    CR equal to the long group's token share."""
    from megatron_hbp.planner.synth import synth_lengths

    lengths = synth_lengths("tulu3_longcite", seed=0, scale=0.05)
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    keys = ("isf", "hbp_groups", "hbp", "hbp_ours", "dynamic_cp", "dynamic_cp_upstream")
    strategies = [s for s in default_strategies(cm) if s.key in keys]
    assert [s.key for s in strategies] == list(keys)
    res = run_strategies(lengths, cm, strategies)
    isf, groups, hbp, ours, dyn, upstream = res
    print("\n" + format_table(res))
    assert isf.gpu_hours > groups.gpu_hours > hbp.gpu_hours
    assert isf.gpu_hours / groups.gpu_hours > 1.1 and isf.gpu_hours / hbp.gpu_hours > 1.3
    assert isf.abr > groups.abr > hbp.abr
    assert hbp.abr < 0.05 and isf.cr == 1.0 and 0.1 < hbp.cr < 0.35
    assert ours.gpu_hours <= hbp.gpu_hours * 1.01
    assert dyn.gpu_hours > 0
    # upstream's packing scheduler: static CP 8 for every pack (CR 1), nothing dropped at this size
    assert upstream.cr == 1.0 and upstream.extra["cp"] == 8 and upstream.tokens == int(lengths.sum())
