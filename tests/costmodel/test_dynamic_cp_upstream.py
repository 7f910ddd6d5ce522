"""Megatron-LM's sequence-packing scheduler (DpBalancedScheduler at d98e8a64) and its simulation.

Every expected schedule below is worked through upstream's code by hand (data_schedule.py,
``DpBalancedScheduler.get_groups_and_subsamples``): next-fit in arrival order under
``max_seqlen_per_dp_cp_rank * cp_size``, then the pack count made a multiple of dp by popping the
last sub-sample of packs (walking back from the last) into new packs appended at the end, then
micro-batch i, rank j -> pack ``int(i * dp + j / cp)``. Times use the unit GPU of test_costmodel.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_hbp.costmodel import simulate_dynamic_cp_upstream
from megatron_hbp.costmodel.dynamic_cp_upstream import (
    DpBalancedScheduler,
    align_pack_count,
    pack_in_order,
    schedule_step_upstream,
)
from tests.costmodel.test_costmodel import ATTN_S_PER_PAIR, unit_model
from tests.costmodel.test_simulate import DP_S, OPT_S, t_cp1


def test_next_fit_in_arrival_order():
    # cap 8: 5 | +3 = 8 fits (<=) | 4 opens | +2 = 6 | 7 opens | +1 = 8
    assert pack_in_order([5, 3, 4, 2, 7, 1], 8) == [[0, 1], [2, 3], [4, 5]]
    # no sorting: the same lengths in another order pack differently
    assert pack_in_order([5, 4, 3, 2, 7, 1], 8) == [[0], [1, 2], [3], [4, 5]]


def test_first_sample_over_the_cap_leaves_an_empty_pack():
    # upstream appends the (empty) open pack before a sub-sample that does not fit
    assert pack_in_order([10, 1], 8) == [[], [0], [1]]


def test_groups_two_dp_replicas_of_cp_two():
    """[5, 3, 4, 2, 7, 1], max 4 tokens per rank x CP 2 = 8 -> packs [0,1] [2,3] [4,5]; 3 is not a
    multiple of dp = 2: pack 2 gives its last sub-sample (5) to a new pack -> [0,1] [2,3] [4] [5];
    2 micro-batches; ranks 0,1 (replica 0) run packs 0 and 2, ranks 2,3 packs 1 and 3."""
    sched = DpBalancedScheduler(4, cp_size=2, dp_size=2)
    got = sched.get_groups_and_subsamples(list(enumerate([5, 3, 4, 2, 7, 1])))
    assert got == [[[0, 1], [0, 1], [2, 3], [2, 3]], [[4], [4], [5], [5]]]
    assert schedule_step_upstream([5, 3, 4, 2, 7, 1], 4, 2, 2) == [[[0, 1], [2, 3]], [[4], [5]]]


def test_alignment_pops_repeatedly_from_the_same_pack():
    """[1, 7, 1, 1, 1], cap 8 -> [0,1] [2,3,4]; dp 4 needs 2 more packs: pack 1 gives 4, then 3
    (appended in that order) -> [0,1] [2] [4] [3]: one micro-batch."""
    packs = align_pack_count(pack_in_order([1, 7, 1, 1, 1], 8), 4)
    assert packs == [[0, 1], [2], [4], [3]]
    assert DpBalancedScheduler(8, 1, 4).get_groups_and_subsamples(list(enumerate([1, 7, 1, 1, 1]))) == [
        [[0, 1], [2], [4], [3]]
    ]


def test_alignment_asserts_when_the_walk_reaches_pack_zero():
    """[2, 2, 2, 7, 7], cap 8 -> [0,1,2] [3] [4]; dp 2: packs 2 and 1 are single, the walk reaches
    pack 0 and upstream's ``assert i > 0`` fires (even though pack 0 could be split)."""
    with pytest.raises(ValueError, match="not enough samples to move"):
        DpBalancedScheduler(8, 1, 2).get_groups_and_subsamples(list(enumerate([2, 2, 2, 7, 7])))


def test_virtual_pipeline_multiple():
    # multiple = dp 2 x vp group 2 = 4: [0,1] [2,3] [4,5] -> pop 5 -> [0,1] [2,3] [4] [5]; 2 micro-batches
    sched = DpBalancedScheduler(8, 1, 2, microbatch_group_size_per_vp_stage=2)
    assert sched.get_groups_and_subsamples(list(enumerate([5, 3, 4, 2, 7, 1]))) == [
        [[0, 1], [2, 3]],
        [[4], [5]],
    ]


def test_simulated_step_hand_case():
    """2 GPUs, CP 1 (dp 2), 1000 tokens per rank; samples [600, 400, 900, 100] arrive in the order of
    ``default_rng(0).permutation(4)`` = [2, 0, 1, 3], i.e. 900, 600, 400, 100 -> packs [900]
    [600, 400] [100]; aligned to 2: [900] [600] [100] [400]. Replica 0 runs [900] then [100],
    replica 1 [600] then [400]; the step waits for replica 0."""
    np.testing.assert_array_equal(np.random.default_rng(0).permutation(4), [2, 0, 1, 3])
    cm = unit_model(num_gpus=2)
    res = simulate_dynamic_cp_upstream(
        np.array([600, 400, 900, 100]), cm, tokens_per_step=10_000, max_seqlen_per_rank=1000
    )
    assert res.extra["cp"] == 1 and res.extra["micro_batches_per_step"] == 2
    rep0 = t_cp1([900]) + t_cp1([100])
    rep1 = t_cp1([600]) + t_cp1([400])
    assert rep0 == pytest.approx(1e-3 + (405450 + 5050) * ATTN_S_PER_PAIR) and rep0 > rep1
    np.testing.assert_allclose(res.step_times, [rep0 + DP_S + OPT_S], rtol=1e-12)
    assert res.extra["balanced_s"] == pytest.approx((rep0 + rep1) / 2, rel=1e-12)
    # DBR: 1000 vs 1000 tokens -> 0; ABR: 900^2 + 100^2 = 820,000 vs 520,000 -> 1 - 670,000 / 820,000
    assert res.dbr == pytest.approx(0.0)
    assert res.abr == pytest.approx(1 - 670_000 / 820_000)
    assert res.tokens == 2000 and res.num_dropped == 0 and res.cr == 0.0


def test_simulated_cp_size_and_recompute_default():
    """A 1500-token sample needs CP 2 at 1000 tokens per rank (CP-padded to 1500, <= 2000): one
    replica of 2 GPUs, the pack [1500, 300] on CP 2, same time as the CP-2 plan row of test_simulate."""
    cm = unit_model(num_gpus=2)
    res = simulate_dynamic_cp_upstream(
        np.array([1500, 300]), cm, tokens_per_step=10_000, max_seqlen_per_rank=1000, recompute_layers=0
    )
    assert res.extra["cp"] == 2 and res.cr == 1.0
    # 1500 + 300 = 1800 padded tokens on 2 ranks: 900 per rank; zigzag pairs of rank r per document
    from megatron_hbp.costmodel import zigzag_attention_pairs

    pairs = zigzag_attention_pairs(np.array([1500, 300]), np.array([0, 2]), 2)
    compute, comm = cm.microbatch_breakdown([1800], pairs, 2, 0)
    np.testing.assert_allclose(res.step_times, [compute[0] + comm[0] + DP_S + OPT_S], rtol=1e-12)


def test_simulated_unschedulable_batch_is_counted_as_dropped():
    """[800, 900, 700] arrive as [700, 800, 900] (``default_rng(0).permutation(3)`` = [2, 0, 1]);
    1700-token batches: [700, 800] (900 would exceed) and [900]. The first is 2 packs for 2
    replicas; the second is one pack that upstream cannot split into 2 (its assert): counted as
    dropped (1 sample, 900 tokens), not silently lost."""
    np.testing.assert_array_equal(np.random.default_rng(0).permutation(3), [2, 0, 1])
    cm = unit_model(num_gpus=2)
    res = simulate_dynamic_cp_upstream(
        np.array([800, 900, 700]), cm, tokens_per_step=1700, max_seqlen_per_rank=1000, seed=0
    )
    assert res.num_steps == 1 and res.num_dropped == 1
    assert res.tokens == 1500 and res.extra["dropped_tokens"] == 900
    np.testing.assert_allclose(res.step_times, [t_cp1([800]) + DP_S + OPT_S], rtol=1e-12)


def test_simulated_sample_over_the_cap_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds max_seqlen_per_rank x CP"):
        simulate_dynamic_cp_upstream(
            np.array([5000, 10]),
            unit_model(num_gpus=2),
            tokens_per_step=10_000,
            max_seqlen_per_rank=1000,
            cp=2,
        )
