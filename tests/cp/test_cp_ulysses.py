"""Ulysses CP attention (``megatron_hbp.cp.ulysses``) against an independent float64 reference.

Real gloo process groups (2 and 4 processes), one spawn per world size shared by all checks:
outputs and q/k/v gradients of every rank's shard, fp32, relative error ≤ 1e-5. Plus, counted
from what the attention kernel is given on each rank: its (query, key) pairs x heads are exactly
the c = 1 total / c; and the tensors autograd saves for one Ulysses attention layer
(``saved_tensors_hooks``) total ≤ 1.1x the local q, k, v and output, none holding more elements
than the local query shard (no whole-pack, all-heads tensor). The reference is the one of
tests/cp/test_cp_attention.py (explicit scores in float64, no code shared with cp/).
"""

from __future__ import annotations

import pytest
import torch

from megatron_hbp.cp import cp_attention, shard_for_cp
from megatron_hbp.cp.ulysses import check_ulysses_heads, kv_heads_per_rank, ulysses_comm_bytes
from tests.cp.test_cp_attention import _spawn, make_case, rel_err

TOL_FP32 = 1e-5

# (name, real lengths, hq, hkv, d): the cases — mixed documents with GQA; one long
# document; MQA; c > K/V heads (replication); length-1 documents; a rank whose zigzag shard is
# only padding (one 1-token document: at c = 4 ranks 1..3 hold padding only); odd lengths.
CASES = [
    ("mixed_gqa", [5, 1, 13, 2, 7], 8, 4, 8),
    ("one_long_doc", [61], 4, 4, 8),
    ("mqa", [16, 9], 4, 1, 8),
    ("kv_replicated", [11, 3], 8, 2, 4),  # c = 4 > 2 K/V heads: each K/V head on 2 ranks
    ("length_one_docs", [1, 1, 2, 1, 3], 4, 2, 4),
    ("padding_only_rank", [1], 4, 2, 4),
    ("odd_lengths", [7, 3, 9, 5], 4, 4, 4),
    ("straddling_groups", [9, 6], 12, 3, 4),  # c = 2: 6 query heads per rank read 2 of 3 K/V heads
]


def test_head_layout_hand_checked():
    # 8 query / 4 K/V heads: c = 2 keeps whole groups, c = 8 replicates each K/V head to 2 ranks.
    assert kv_heads_per_rank(8, 4, 2) == ((0, 1), (2, 3))
    assert kv_heads_per_rank(8, 4, 8) == ((0,), (0,), (1,), (1,), (2,), (2,), (3,), (3,))
    assert kv_heads_per_rank(4, 1, 4) == ((0,), (0,), (0,), (0,))  # MQA
    # 12 query / 3 K/V heads (groups of 4), c = 2: rank 0 has query heads 0..5 -> K/V 0,0,0,0,1,1.
    assert kv_heads_per_rank(12, 3, 2) == ((0, 0, 0, 0, 1, 1), (1, 1, 2, 2, 2, 2))
    assert check_ulysses_heads(32, 8, 8) is None
    msg = check_ulysses_heads(6, 2, 4)
    assert "6 query heads" in msg and "cp=4" in msg and "allgather" in msg
    with pytest.raises(ValueError, match="divisible by cp"):
        kv_heads_per_rank(6, 2, 4)


def test_comm_bytes_hand_checked():
    # T = 64, 8 q heads, 4 K/V heads, d = 2, c = 2, bf16: local 32 tokens; m = 2 K/V heads per rank.
    # forward: q|k|v buffer (8 + 2*2*2) * 2 * 32 = 1024 elements and output 8*2*32 = 512 elements,
    # half of each leaves the rank: 768 elements; backward the same; 2 bytes each: 3072 bytes.
    assert ulysses_comm_bytes(64, 8, 4, 2, 2, dtype_bytes=2) == 3072
    assert ulysses_comm_bytes(64, 8, 4, 2, 2, dtype_bytes=2, backward=False) == 1536
    # one more forward for a recomputed layer, two layers
    assert ulysses_comm_bytes(64, 8, 4, 2, 2, num_layers=2, recompute_layers=1) == 3 * 1536 + 2 * 1536
    assert ulysses_comm_bytes(64, 8, 4, 2, 1) == 0


@pytest.mark.parametrize("block", [1, 4, 1024])
def test_document_attention_query_blocks(monkeypatch, block):
    """One process (c = 1): the exact per-document attention in query blocks of ``block`` rows
    (documents longer than a block: keys up to each block's end) vs the float64 reference."""
    import megatron_hbp.cp.ulysses as uly

    monkeypatch.setattr(uly, "_Q_BLOCK", block)
    ref = make_case([11, 1, 6, 9], 1, 8, 2, 8, seed=3)
    q, k, v = (ref[n].float().requires_grad_() for n in "qkv")
    out = uly.ulysses_attention(q, k, v, ref["cu_pad"], ref["cu_real"], None)
    out.backward(ref["dout"].float())
    assert rel_err(out, ref["out"]) <= TOL_FP32
    for n, t in zip("qkv", (q, k, v)):
        assert rel_err(t.grad, ref["d" + n]) <= TOL_FP32, n


# --------------------------------------------------------------------------------------------
# Real process groups


def _pairs_x_heads(cu, heads):
    cu = [int(x) for x in cu]
    return heads * sum((b - a) * (b - a + 1) // 2 for a, b in zip(cu[:-1], cu[1:]))


def _dist_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    import megatron_hbp.cp.ulysses as uly
    from megatron_hbp.cp import build_cp_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// from tests.distributed
    results: dict = {}
    given = []  # what the attention kernel receives on this rank
    real_attend = uly._attend

    def spy(qg, kg, vg, lay, scale, backend):
        given.append((int(qg.shape[0]), int(qg.shape[1]), tuple(int(x) for x in lay.cu.tolist())))
        return real_attend(qg, kg, vg, lay, scale, backend)

    uly._attend = spy
    try:
        degrees = [c for c in (1, 2, 4) if c <= world]
        groups = build_cp_groups(degrees)
        for c in degrees:
            group, r, rep = groups.cp_group(c), groups.cp_rank(c), groups.replica_index(c)
            for name, lengths, hq, hkv, d in CASES:
                if check_ulysses_heads(hq, hkv, c):
                    continue
                ref = make_case(lengths, c, hq, hkv, d, seed=1000 * c + 17 * rep + len(name))
                cu_pad, cu_real = ref["cu_pad"], ref["cu_real"]
                q, k, v = (shard_for_cp(ref[n].float(), cu_pad, c, r).requires_grad_() for n in "qkv")
                given.clear()
                saved = []

                def pack(t, saved=saved):
                    saved.append((tuple(t.shape), t.numel() * t.element_size()))
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = uly.ulysses_attention(q, k, v, cu_pad, cu_real, group if c > 1 else None)
                (out * shard_for_cp(ref["dout"].float(), cu_pad, c, r)).sum().backward()
                errs = {"out": rel_err(out, shard_for_cp(ref["out"], cu_pad, c, r))}
                for n, t in zip("qkv", (q, k, v)):
                    want = shard_for_cp(ref["d" + n], cu_pad, c, r)
                    errs["d" + n] = (
                        rel_err(t.grad, want) if want.abs().max() > 0 else float(t.grad.abs().max())
                    )
                local_bytes = sum(x.numel() * x.element_size() for x in (q, k, v, out))
                # the fixed all-gather path on the same shard: what it saves for backward
                ag_saved = []
                with torch.autograd.graph.saved_tensors_hooks(
                    lambda t, ag_saved=ag_saved: ag_saved.append(tuple(t.shape)) or t, lambda t: t
                ):
                    ag_out = cp_attention(q, k, v, cu_pad, cu_real, group if c > 1 else None)
                errs["allgather_vs_ulysses"] = rel_err(ag_out, out) if out.abs().max() > 0 else 0.0
                ((rows, heads, cu),) = given
                results[f"{name}_c{c}"] = {
                    "errs": errs,
                    "pairs": _pairs_x_heads(cu, heads),
                    "pairs_c1": _pairs_x_heads(cu_pad, hq),
                    "kernel_rows": rows,
                    "total_tokens": int(cu_pad[-1]),
                    "saved": saved,
                    "saved_bytes": sum(b for _, b in saved),
                    "local_bytes": local_bytes,
                    "local_q_numel": q.numel(),
                    "local_kv_numel": k.numel(),
                    "allgather_saved": ag_saved,
                }
        dist.barrier()
    finally:
        uly._attend = real_attend
        dist.destroy_process_group()
    return results


@pytest.fixture(scope="module")
def dist2():
    return _spawn(2, _dist_worker)


@pytest.fixture(scope="module")
def dist4():
    return _spawn(4, _dist_worker)


def _numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def _check(results, c, name):
    _, _, hq, hkv, d = next(x for x in CASES if x[0] == name)
    if check_ulysses_heads(hq, hkv, c):
        pytest.skip(f"{hq} heads not divisible by c={c}")
    for rank, res in enumerate(results):
        r = res[f"{name}_c{c}"]
        assert max(r["errs"].values()) <= TOL_FP32, (rank, r["errs"])
        # exact work: every rank's kernel gets all T tokens of H / c heads -> pairs x heads = total / c
        assert r["kernel_rows"] == r["total_tokens"]
        assert r["pairs"] * c == r["pairs_c1"], (rank, r["pairs"], r["pairs_c1"])
        if c > 1:
            # memory: what one layer saves for backward is the local q, k, v, output (+ fp32 LSE)
            # (replicated K/V heads — c > K/V heads, or groups straddling ranks — are received
            # m·c > H_kv times: their copies are the one inherent extra)
            replicated = len(kv_heads_per_rank(hq, hkv, c)[0]) * c > hkv
            assert replicated or r["saved_bytes"] <= 1.1 * r["local_bytes"], (rank, r["saved"])
            assert all(b <= r["local_q_numel"] * 4 for _, b in r["saved"]), (rank, r["saved"])
            # the fixed all-gather keeps only its local q, k, v: nothing of T x query-heads elements
            assert r["allgather_saved"], "all-gather saved nothing: the check would be vacuous"
            big = [s for s in r["allgather_saved"] if _numel(s) >= r["total_tokens"] * hq * d]
            assert not big, (rank, r["allgather_saved"])


@pytest.mark.slow
@pytest.mark.parametrize("c", [1, 2, 4])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ulysses_4_processes(dist4, c, name):
    _check(dist4, c, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_ulysses_2_processes(dist2, name):
    _check(dist2, 2, name)


@pytest.mark.slow
def test_ulysses_saves_local_sizes_only(dist4):
    # GQA 8/4 heads at c = 4 (no replication): saved = q, k, v, out (+ LSE [T, hq/c] fp32); none is
    # the whole pack at all heads. Hand count for mixed_gqa: T = 48 (spans padded to 8), d = 8.
    r = dist4[0]["mixed_gqa_c4"]
    T, d = 48, 8
    shapes = sorted(tuple(s) for s, _ in r["saved"])  # JSON gave lists
    assert shapes == sorted([(T, 2, d), (T, 1, d), (T, 1, d), (T, 2, d), (T, 2)]), shapes
    assert r["saved_bytes"] == 4 * (T * 2 * d * 2 + T * 1 * d * 2 + T * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("hq", "m"), [(8, 2), (4, 1), (4, 4)])
def test_varlen_kernel_matches_document_attention_cuda(hq, m):
    """The CUDA kernel of every Ulysses rank (varlen, GQA) vs the exact per-document attention."""
    import megatron_hbp.cp.ulysses as uly

    cu = (0, 40, 48, 176, 184)
    lay = uly._layout_on(cu, (0, 37, 45, 170, 171), 1, torch.device("cuda"))
    g = torch.Generator().manual_seed(0)
    qg = torch.randn(184, hq, 64, generator=g).cuda().bfloat16().requires_grad_()
    kg = torch.randn(184, m, 64, generator=g).cuda().bfloat16().requires_grad_()
    vg = torch.randn(184, m, 64, generator=g).cuda().bfloat16().requires_grad_()
    dout = torch.randn(184, hq, 64, generator=g).cuda().bfloat16()
    got = uly._attend(qg, kg, vg, lay, 0.125, "varlen")
    grads = torch.autograd.grad(got, (qg, kg, vg), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (qg, kg, vg))
    want = uly._attend(q32, k32, v32, lay, 0.125, "sdpa")
    wgrads = torch.autograd.grad(want, (q32, k32, v32), dout.float())
    assert rel_err(got.float(), want) <= 2e-2
    for a, b in zip(grads, wgrads):
        assert rel_err(a.float(), b) <= 3e-2
