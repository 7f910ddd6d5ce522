"""Planner building blocks, each against small cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_hbp.planner import (
    GroupConfig,
    Plan,
    PlanConfig,
    balance_layout,
    best_fit_decreasing,
    compute_metrics,
    cp_padded,
    group_data,
    isf_pack,
    next_fit,
    order_steps,
    replica_sums,
    zigzag_attention_pairs,
    zigzag_doc_pairs,
)
from megatron_hbp.planner.packing import stable_argsort_int
from megatron_hbp.planner.plan import lengths_digest


def test_group_data_boundaries():
    # group i holds pack_lengths[i-1] < len <= pack_lengths[i]; 2 = longer than every group
    got = group_data(np.array([1, 4, 5, 8, 9]), [4, 8])
    assert got.tolist() == [0, 0, 1, 1, 2]


def test_cp_padding():
    assert cp_padded(np.array([1, 4, 5, 8, 9]), 2).tolist() == [4, 4, 8, 8, 12]  # multiples of 2*cp = 4
    assert cp_padded(np.array([1, 17, 16]), 8).tolist() == [16, 32, 16]
    assert cp_padded(np.array([1, 5]), 1).tolist() == [1, 5]


def test_next_fit():
    # [3,3] fills 6; 3 opens bin 1 and 2 joins it; 5 does not fit (5+5 > 6)
    assert next_fit(np.array([3, 3, 3, 2, 5]), 6).tolist() == [0, 0, 1, 1, 2]


def test_isf_keeps_full_packs_and_repacks_the_rest():
    # Three 4s fill their own bins whatever the order; the 1 never fills a bin, so round 1 keeps
    # bins 0..2 (the 4s) and the last round packs the 1 alone into bin 3.
    rng = np.random.default_rng(0)
    b = isf_pack(np.array([4, 4, 4, 1]), 4, rng, threshold=1.0, iterations=2)
    assert b[3] == 3
    assert sorted(b[:3].tolist()) == [0, 1, 2]


def test_isf_single_round_is_next_fit_of_a_shuffle():
    sizes = np.array([3, 1, 2, 2, 4, 1, 3])
    b = isf_pack(sizes, 5, np.random.default_rng(7), threshold=1.0, iterations=1)
    perm = np.random.default_rng(7).permutation(len(sizes))
    expect = np.empty(len(sizes), dtype=np.int64)
    expect[perm] = next_fit(sizes[perm], 5)
    assert b.tolist() == expect.tolist()


def test_best_fit_decreasing_by_hand():
    # sorted: 5 4 3 3 2 2 1 into 8: 5->b0(gap 3); 4->b1(gap 4); 3->b0 (best: gap 3); 3->b1 (gap 1);
    # 2->b2 (gap 6); 2->b2 (gap 4); 1->b1 (best: gap 1)
    b, gaps = best_fit_decreasing(np.array([5, 4, 3, 3, 2, 2, 1]), 8)
    assert b.tolist() == [0, 1, 0, 1, 2, 2, 1]
    assert gaps.tolist() == [0, 0, 4]


def test_best_fit_prefers_the_tightest_bin():
    # existing gaps 5 and 3: a 3 goes into the gap-3 bin (first fit would pick the gap-5 bin)
    b, gaps = best_fit_decreasing(np.array([3]), 10, gaps=np.array([5, 3]), open_new=False)
    assert b.tolist() == [1]
    assert gaps.tolist() == [5, 0]


def test_greedy_fill_core_by_hand():
    # gaps [3, 5], items 4 3 2 2 1: 4->bin1 (gap 1), 3->bin0 (gap 0), 2s fit nowhere, 1->bin1
    b, gaps = best_fit_decreasing(np.array([4, 3, 2, 2, 1]), 8, gaps=np.array([3, 5]), open_new=False)
    assert b.tolist() == [1, 0, -1, -1, 1]
    assert gaps.tolist() == [0, 0]


def test_best_fit_matches_a_naive_reference():
    def naive(sizes, cap):
        gaps, out = [], []
        for s in sorted(sizes, reverse=True):
            fit = [j for j, g in enumerate(gaps) if g >= s]
            if fit:
                j = min(fit, key=lambda j: gaps[j])
            else:
                gaps.append(cap)
                j = len(gaps) - 1
            gaps[j] -= s
            out.append(j)
        return sorted(gaps)

    rng = np.random.default_rng(1)
    for _ in range(100):
        cap = int(rng.integers(4, 40))
        sizes = rng.integers(1, cap + 1, int(rng.integers(1, 50)))
        b, gaps = best_fit_decreasing(sizes, cap, np.random.default_rng(0))
        assert sorted(gaps.tolist()) == naive(sizes.tolist(), cap)
        fill = np.bincount(b, weights=sizes)
        assert (fill <= cap).all() and (b >= 0).all()


def test_stable_argsort_int_matches_numpy():
    rng = np.random.default_rng(0)
    for hi in (10, 70000, 2**31 - 1):
        k = rng.integers(0, hi, 5000)
        assert (stable_argsort_int(k) == np.argsort(k, kind="stable")).all()


# ----------------------------------------------------------------------------- balancing

ATTN = np.array([10.0, 9.0, 8.0, 1.0])


def test_sort_is_slot_major_over_sorted_packs():
    # sorted packs 0(10) 1(9) 2(8) 3(1): slot 0 = packs 0,1 side by side, slot 1 = packs 2,3
    lay = balance_layout("sort", ATTN, ATTN, R=2, m=2, rng=np.random.default_rng(0))
    assert lay.tolist() == [[[0, 2], [1, 3]]]
    assert replica_sums(lay, ATTN).tolist() == [[18.0, 10.0]]


def test_lpt_by_hand():
    # round 0: 10->r0, 9->r1; round 1 (lightest first): 8->r1 (17), 1->r0 (11); no swap lowers 17;
    # each replica's packs heaviest first.
    lay = balance_layout("lpt", ATTN, ATTN, R=2, m=2, rng=np.random.default_rng(0))
    assert lay.tolist() == [[[0, 3], [1, 2]]]
    assert replica_sums(lay, ATTN).tolist() == [[11.0, 17.0]]


def test_lpt_swap_refinement_by_hand():
    # costs 10 6 5 5 4 2, R=2, m=3. LPT: r0 = 10,5,2 (17), r1 = 6,5,4 (15).
    # Swapping r0's 5 with r1's 4 gives 16/16.
    c = np.array([10.0, 6.0, 5.0, 5.0, 4.0, 2.0])
    no_swap = balance_layout("lpt", c, c, R=2, m=3, rng=np.random.default_rng(0), swap_iterations=0)
    assert sorted(replica_sums(no_swap, c)[0].tolist()) == [15.0, 17.0]
    lay = balance_layout("lpt", c, c, R=2, m=3, rng=np.random.default_rng(0))
    assert replica_sums(lay, c)[0].tolist() == [16.0, 16.0]
    assert sorted(lay.reshape(-1).tolist()) == list(range(6))


def test_none_is_a_permutation_and_lpt_uses_the_cost_not_attn():
    lay = balance_layout("none", ATTN, ATTN, R=2, m=2, rng=np.random.default_rng(3))
    assert sorted(lay.reshape(-1).tolist()) == [0, 1, 2, 3]
    # with cost reversed, lpt pairs by cost: cost 1,2,3,10 -> round 0: 10->r0 (pack 3), 3->r1 (pack 2)...
    cost = np.array([1.0, 2.0, 3.0, 10.0])
    lay = balance_layout("lpt", ATTN, cost, R=2, m=2, rng=np.random.default_rng(0))
    assert replica_sums(lay, cost).tolist() == [[11.0, 5.0]]


def test_balance_rejects_wrong_pack_count():
    with pytest.raises(ValueError, match="multiple of R\\*m"):
        balance_layout("sort", ATTN[:3], ATTN[:3], R=2, m=2, rng=np.random.default_rng(0))


def test_closest_run_for_the_extra_step():
    from megatron_hbp.planner.build import _closest_run

    # windows of 2: (2-1)/1.5, (10-2)/6, (10.5-10)/10.25, (30-10.5)/20.25 -> the third is tightest
    assert _closest_run(np.array([1.0, 2.0, 10.0, 10.5, 30.0]), 2) == 2
    assert _closest_run(np.array([1.0, 2.0]), 0) == 0


# ----------------------------------------------------------------------------- curriculum


def test_curriculum_then_even_interleaving():
    # steps 0..3 in group 0 (4K), 4..5 in group 1 (8K); first 2 steps from group 0 only;
    # the rest interleaved at (j+0.5)/n: g0 {2: .25, 3: .75}, g1 {4: .25, 5: .75}
    got = order_steps(np.array([0, 0, 0, 0, 1, 1]), [4, 8], 2, 4, None)
    assert got.tolist() == [0, 1, 2, 4, 3, 5]


def test_interleaving_puts_a_lone_long_step_in_the_middle():
    got = order_steps(np.array([0, 0, 0, 0, 1]), [4, 8], 0, 4, None)
    assert got.tolist() == [0, 1, 4, 2, 3]


def test_curriculum_longer_than_short_steps_keeps_all():
    got = order_steps(np.array([1, 0, 1]), [4, 8], 10, 4, np.random.default_rng(0))
    assert got[0] == 1 and sorted(got.tolist()) == [0, 1, 2]


# ----------------------------------------------------------------------------- zigzag cost


def test_zigzag_cost_by_hand():
    # l=5, cp=2: padded 8, chunks of 2: q{0,1}=1+2, q{2,3}=3+4, q{4}=5, q{5,6,7} padding
    # rank0 = chunks 0,3 = 3; rank1 = chunks 1,2 = 12.  l=8: rank0 = 3+15, rank1 = 7+11.
    assert zigzag_doc_pairs(np.array([5, 8]), 2).tolist() == [[3, 12], [18, 18]]
    assert zigzag_doc_pairs(np.array([5]), 1).tolist() == [[15]]
    assert zigzag_attention_pairs(np.array([5, 8]), np.array([0, 2, 2]), 2).tolist() == [
        [21, 30],
        [0, 0],
    ]


def test_zigzag_cost_offsets_need_not_start_at_zero():
    # documents 1..2 only: [5, 8] -> as above; document 0 (length 99) is outside every pack
    got = zigzag_attention_pairs(np.array([99, 5, 8]), np.array([1, 2, 2, 3]), 2)
    assert got.tolist() == [[3, 12], [0, 0], [18, 18]]


def test_zigzag_cost_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        cp = int(rng.choice([1, 2, 3, 4]))
        lens = rng.integers(1, 40, int(rng.integers(1, 4)))
        want = np.zeros(cp, dtype=np.int64)
        for n in lens:
            padded = -(-n // (2 * cp)) * 2 * cp
            chunk = padded // (2 * cp)
            for q in range(n):
                j = q // chunk
                r = j if j < cp else 2 * cp - 1 - j
                want[r] += q + 1
        assert zigzag_attention_pairs(lens, np.array([0, len(lens)]), cp)[0].tolist() == want.tolist()


# ----------------------------------------------------------------------------- metrics


def _hand_plan() -> Plan:
    """Step 0: group 0 (10 tokens, cp1), 2 replicas x 1 mb: packs [3,4] and [6].
    Step 1: group 1 (12 tokens, cp2), 1 replica x 1 mb: pack [5]."""
    cfg = PlanConfig(
        groups=[GroupConfig(pack_length=10, cp=1), GroupConfig(pack_length=12, cp=2)],
        world_size=2,
        micro_batches_per_step=1,
    )
    lengths = np.array([3, 4, 6, 5], dtype=np.int32)
    arrays = {
        "samples": np.array([0, 1, 2, 3], dtype=np.int32),
        "lengths": lengths,
        "pack_offsets": np.array([0, 2, 3, 4], dtype=np.int64),
        "pack_loss_tokens": np.array([7, 6, 5], dtype=np.int64),
        "step_pack_offsets": np.array([0, 2, 3], dtype=np.int64),
        "step_group": np.array([0, 1], dtype=np.int32),
        "step_micro_batches": np.array([1, 1], dtype=np.int32),
        "step_epoch": np.array([0, 0], dtype=np.int32),
        "step_loss_tokens": np.array([13, 5], dtype=np.int64),
        "dropped_indices": np.zeros(0, np.int64),
        "dropped_reasons": np.zeros(0, np.int8),
        "dropped_epochs": np.zeros(0, np.int32),
    }
    return Plan(
        config=cfg, arrays=arrays, num_samples=4, fingerprint=None, lengths_sha256=lengths_digest(lengths)
    )


def test_metrics_by_hand():
    m = compute_metrics(_hand_plan())
    # step 0: PR = 1 - 13/20; DBR = (7-7 + 7-6)/(7*2); ABR = (36-25 + 0)/(36*2); ave = 13/2
    # step 1 (pack 12, one replica): PR = 1 - 5/12, DBR = ABR = 0, ave = 5/2
    assert m["PR"] == pytest.approx((0.35 + 7 / 12) / 2)
    assert m["DBR"] == pytest.approx((1 / 14) / 2)
    assert m["ABR"] == pytest.approx((11 / 72) / 2)
    assert m["ave_tokens"] == pytest.approx(4.5)
    assert m["CR"] == pytest.approx(5 / 18)
    g0, g1 = m["per_group"]
    assert g0["PR"] == pytest.approx(0.35) and g0["ABR"] == pytest.approx(11 / 72) and g0["CR"] == 0.0
    assert g1["PR"] == pytest.approx(7 / 12) and g1["DBR"] == 0.0 and g1["CR"] == 1.0
    assert g0["slot_ABR"] == pytest.approx(11 / 72)
    assert g0["token_share"] == pytest.approx(13 / 18)
    # zigzag inside the cp=2 replica: l=5 -> ranks [3, 12]: max/mean = 12 / 7.5
    assert g1["cp_rank_max_over_mean"] == pytest.approx(12 / 7.5)


def test_step_view_by_hand():
    plan = _hand_plan()
    s0, s1 = plan.step(0), plan.step(1)
    assert (s0.cp, s0.pack_length, len(s0.replicas), s0.num_tokens, s0.loss_tokens) == (1, 10, 2, 13, 13)
    p = s0.replicas[0].micro_batches[0].packs[0]
    assert p.sample_indices.tolist() == [0, 1] and p.cu_seqlens.tolist() == [0, 3, 7]
    assert p.cu_seqlens_padded.tolist() == [0, 3, 7]
    q = s1.replicas[0].micro_batches[0].packs[0]
    assert (
        q.lengths.tolist() == [5]
        and q.padded_lengths.tolist() == [8]
        and q.cu_seqlens_padded.tolist() == [0, 8]
    )
    assert list(s1.replicas[0].ranks) == [0, 1]
    assert [s.index for s in plan] == [0, 1]
    with pytest.raises(IndexError, match="2 steps"):
        plan.step(2)
