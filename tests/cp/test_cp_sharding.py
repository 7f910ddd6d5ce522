"""CP sharding, group layout and communication accounting (single process, fast)."""

from __future__ import annotations

import pytest
import torch

from megatron_hbp.cp import (
    cp_comm_bytes,
    cp_group_ranks,
    cp_local_indices,
    cp_position_ids,
    dp_cp_group_ranks,
    shard_for_cp,
    unshard_from_cp,
)

# --------------------------------------------------------------------------------------------
# Sharding: hand-checked examples


def test_shard_two_documents_cp2_by_hand():
    # doc0 = tokens 0..3 (chunks of 1), doc1 = tokens 4..11 (chunks of 2).
    # rank 0 keeps chunks 0 and 3 of each, rank 1 chunks 1 and 2.
    x = torch.arange(12)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    assert shard_for_cp(x, cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert shard_for_cp(x, cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    assert cp_position_ids(cu, 2, 0).tolist() == [0, 3, 0, 1, 6, 7]
    assert cp_position_ids(cu, 2, 1).tolist() == [1, 2, 2, 3, 4, 5]


def test_shard_one_document_cp4_by_hand():
    x = torch.arange(8) * 10
    cu = [0, 8]
    expected = {0: [0, 70], 1: [10, 60], 2: [20, 50], 3: [30, 40]}
    for r, want in expected.items():
        assert shard_for_cp(x, cu, 4, r).tolist() == want
        assert cp_local_indices(cu, 4, r).tolist() == [w // 10 for w in want]


def test_cp1_is_identity_and_allows_odd_spans():
    x = torch.randn(7, 3)
    cu = [0, 3, 7]  # odd spans are fine without CP
    assert shard_for_cp(x, cu, 1, 0) is x
    assert cp_position_ids(cu, 1, 0).tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert torch.equal(unshard_from_cp([x], cu, 1), x)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_round_trip_random(cp):
    g = torch.Generator().manual_seed(cp)
    for _ in range(5):
        n = int(torch.randint(1, 7, (1,), generator=g))
        spans = (torch.randint(0, 6, (n,), generator=g) * 2 * cp).tolist()  # includes empty spans
        cu = torch.tensor([0] + torch.cumsum(torch.tensor(spans), 0).tolist(), dtype=torch.int32)
        x = torch.randn(int(cu[-1]), 3, 2, generator=g)
        locals_ = [shard_for_cp(x, cu, cp, r) for r in range(cp)]
        assert all(t.shape[0] == x.shape[0] // cp for t in locals_)
        assert torch.equal(unshard_from_cp(locals_, cu, cp), x)
        assert torch.equal(unshard_from_cp(torch.cat(locals_), cu, cp), x)
        # Every global index is owned by exactly one rank.
        owned = torch.cat([cp_local_indices(cu, cp, r) for r in range(cp)])
        assert sorted(owned.tolist()) == list(range(x.shape[0]))
        # Positions restart at every document and match the global index minus the doc start.
        starts = cu[:-1].long()
        for r in range(cp):
            idx = cp_local_indices(cu, cp, r)
            doc = torch.searchsorted(cu.long(), idx, right=True) - 1
            assert torch.equal(cp_position_ids(cu, cp, r), idx - starts[doc])


def test_unshard_is_differentiable():
    cu = [0, 4, 12]
    x = torch.randn(12, requires_grad=True)
    y = unshard_from_cp([shard_for_cp(x, cu, 2, r) for r in range(2)], cu, 2)
    (y * torch.arange(12.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(12.0))


def test_empty_pack():
    x = torch.zeros(0, 4)
    assert shard_for_cp(x, [0], 2, 1).shape == (0, 4)
    assert unshard_from_cp([x, x], [0], 2).shape == (0, 4)


def test_host_copy_cache_never_stale():
    # Device cu_seqlens are copied to the host once per tensor (not per layer); the cache must
    # see in-place edits and never confuse two tensors. Exercised here on CPU tensors directly.
    from megatron_hbp.cp.sharding import _host_copy_cached

    a = torch.tensor([0, 4, 8], dtype=torch.int32)
    assert _host_copy_cached(a) == (0, 4, 8)
    assert _host_copy_cached(a) == (0, 4, 8)
    a[2] = 12  # bumps the version counter
    assert _host_copy_cached(a) == (0, 4, 12)
    b = torch.tensor([0, 2], dtype=torch.int32)
    assert _host_copy_cached(b) == (0, 2)
    del a
    c = torch.tensor([0, 6, 6], dtype=torch.int32)  # may reuse a's id: must not return a's copy
    assert _host_copy_cached(c) == (0, 6, 6)


# --------------------------------------------------------------------------------------------
# Sharding: bad input


@pytest.mark.parametrize(
    ("cu", "cp", "rank", "match"),
    [
        ([0, 6], 2, 0, "not a multiple of 2\\*cp = 4"),
        ([1, 8], 2, 0, "must start with 0"),
        ([0, 8, 4], 2, 0, "non-decreasing"),
        ([0, 8], 2, 2, "cp_rank must be in"),
        ([0, 8], 0, 0, "cp_size must be a positive int"),
    ],
)
def test_bad_layout(cu, cp, rank, match):
    x = torch.zeros(max(cu), 1)
    with pytest.raises(ValueError, match=match):
        shard_for_cp(x, cu, cp, rank)


def test_bad_lengths():
    with pytest.raises(ValueError, match="trailing padding tail"):
        shard_for_cp(torch.zeros(10), [0, 8], 2, 0)
    with pytest.raises(ValueError, match="expected 2 local shards"):
        unshard_from_cp([torch.zeros(4)], [0, 8], 2)
    with pytest.raises(ValueError, match="gathered shards hold 6"):
        unshard_from_cp(torch.zeros(6), [0, 8], 2)
    with pytest.raises(ValueError, match="1-D"):
        shard_for_cp(torch.zeros(8), torch.zeros(2, 2, dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="integers"):
        shard_for_cp(torch.zeros(8), torch.tensor([0.0, 8.0]), 2, 0)


# --------------------------------------------------------------------------------------------
# Group layout: consecutive ranks, and exactly Megatron's "tp-cp-ep-dp-pp" order


def test_group_ranks_by_hand():
    assert cp_group_ranks(4, 1) == [[0], [1], [2], [3]]
    assert cp_group_ranks(4, 2) == [[0, 1], [2, 3]]
    assert cp_group_ranks(4, 4) == [[0, 1, 2, 3]]
    # tp = 2: the DP x CP dimension is the even (tp_rank 0) or odd (tp_rank 1) ranks.
    assert cp_group_ranks(8, 2, tp=2) == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert dp_cp_group_ranks(8, tp=2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # pp = 2: stages are the slowest dimension.
    assert cp_group_ranks(8, 2, pp=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp_cp_group_ranks(8, pp=2) == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(("world", "tp", "pp"), [(8, 1, 1), (16, 2, 1), (16, 2, 2), (32, 4, 2), (24, 1, 3)])
def test_group_ranks_match_megatron(world, tp, pp):
    from megatron.core.parallel_state import RankGenerator

    d = world // (tp * pp)
    for c in [c for c in (1, 2, 4, 8) if d % c == 0]:
        gen = RankGenerator(tp=tp, ep=1, dp=d // c, pp=pp, cp=c, order="tp-cp-ep-dp-pp")
        assert sorted(map(sorted, gen.get_ranks("cp"))) == sorted(cp_group_ranks(world, c, tp=tp, pp=pp))
        assert sorted(map(sorted, gen.get_ranks("dp-cp"))) == sorted(dp_cp_group_ranks(world, tp=tp, pp=pp))


def test_group_ranks_bad_input():
    with pytest.raises(ValueError, match="CP degree 3 does not divide"):
        cp_group_ranks(4, 3)
    with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
        cp_group_ranks(6, 1, tp=4)
    with pytest.raises(ValueError, match="positive int"):
        cp_group_ranks(4, 0)


# --------------------------------------------------------------------------------------------
# Communication accounting


def test_comm_bytes_by_hand():
    # 4096 tokens, cp 2: 2048 local tokens; K+V of 8 heads x 128 in bf16 = 2*2048*8*128*2 = 8 MiB.
    block = 2 * 2048 * 8 * 128 * 2
    assert block == 8 * 2**20
    # One layer: all-gather (1 block sent), in backward all-gather again + reduce-scatter (2 blocks).
    assert cp_comm_bytes(4096, 8, 128, 2) == 3 * block
    assert cp_comm_bytes(4096, 8, 128, 2, backward=False) == block
    # cp 4: each rank sends 3 blocks of 1024 tokens per collective.
    assert cp_comm_bytes(4096, 8, 128, 4) == 3 * 3 * (block // 2)
    # 32 layers, 8 of them recomputed: 32 + 8 + 32 all-gathers and 32 reduce-scatters.
    assert cp_comm_bytes(4096, 8, 128, 2, num_layers=32, recompute_layers=8) == 104 * block
    assert cp_comm_bytes(4096, 8, 128, 1, num_layers=32) == 0
    # More recomputed layers than the stage holds: every layer is recomputed once (Megatron's "block").
    assert cp_comm_bytes(4096, 8, 128, 2, num_layers=16, recompute_layers=28) == 64 * block


def test_comm_bytes_bad_input():
    with pytest.raises(ValueError, match="not divisible by cp_size"):
        cp_comm_bytes(10, 1, 1, 4)
    with pytest.raises(ValueError, match="recompute_layers must be a non-negative int"):
        cp_comm_bytes(8, 1, 1, 2, num_layers=2, recompute_layers=-1)
    with pytest.raises(ValueError, match="cp_size"):
        cp_comm_bytes(8, 1, 1, 0)
