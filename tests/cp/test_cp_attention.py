"""CP attention against an independent float64 reference: forward and gradients of q, k, v.

Two layers of tests:
* in one process, every CP rank simulated with ``cp_attention_local`` (gathered K/V built by
  hand, dK/dV summed over simulated ranks = what the reduce-scatter does) — fast;
* real gloo process groups (2 and 4 processes, ``build_cp_groups``), one spawn per world size
  shared by all cases (``@pytest.mark.slow``).
Tolerance: fp32 relative error (max |a − b| / max |b|) ≤ 1e-5 against float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_hbp.cp import (
    cp_attention,
    cp_attention_local,
    shard_for_cp,
    unshard_from_cp,
)
from tests.distributed import run_ranks

TOL_FP32 = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only fight the other processes for the 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Independent reference (explicit scores, mask, softmax in float64; shares no code with cp/)


def reference_attention(q, k, v, cu_padded, cu_real, scale=None):
    """q [T, hq, d], k/v [T, hkv, d] in global order → [T, hq, d]; padding rows are zero."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    cu_padded, cu_real = [int(c) for c in cu_padded], [int(c) for c in cu_real]
    pieces = []
    for i in range(len(cu_padded) - 1):
        start, span = cu_padded[i], cu_padded[i + 1] - cu_padded[i]
        real = cu_real[i + 1] - cu_real[i]
        if real:
            qd = q[start : start + real]
            kd = k[start : start + real].repeat_interleave(rep, 1)
            vd = v[start : start + real].repeat_interleave(rep, 1)
            scores = torch.einsum("qhd,khd->hqk", qd, kd) * scale
            causal = torch.ones(real, real, dtype=torch.bool, device=q.device).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            pieces.append(torch.einsum("hqk,khd->qhd", probs, vd))
        pieces.append(q.new_zeros((span - real, q.shape[1], q.shape[2])))
    return torch.cat(pieces, 0) if pieces else q.new_zeros(q.shape)


def make_layout(real_lengths, cp):
    """(cu_seqlens_padded, cu_seqlens): every span padded up to a multiple of 2*cp (>= 2*cp)."""
    step = 2 * cp if cp > 1 else 1
    cu_real, cu_pad = [0], [0]
    for n in real_lengths:
        cu_real.append(cu_real[-1] + n)
        cu_pad.append(cu_pad[-1] + max(1, -(-n // step)) * step)
    return torch.tensor(cu_pad, dtype=torch.int32), torch.tensor(cu_real, dtype=torch.int32)


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_case(real_lengths, cp, hq, hkv, d, seed):
    """Global fp64 tensors + reference outputs and gradients for an upstream gradient."""
    cu_pad, cu_real = make_layout(real_lengths, cp)
    t = int(cu_pad[-1])
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(t, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(t, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
    out = reference_attention(q, k, v, cu_pad, cu_real)
    if out.requires_grad:
        out.backward(dout)
    else:  # nothing real to attend (padding-only filler pack): every gradient is zero
        q.grad, k.grad, v.grad = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return {
        "cu_pad": cu_pad,
        "cu_real": cu_real,
        "q": q.detach(),
        "k": k.detach(),
        "v": v.detach(),
        "dout": dout,
        "out": out.detach(),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
    }


# (name, real lengths, hq, hkv, d): odd lengths, documents shorter than 2c, one document,
# length-1 documents (most CP ranks hold only padding), exact multiples, GQA/MQA/MHA.
CASES = [
    ("mixed_gqa", [5, 1, 13, 2, 7], 4, 2, 8),
    ("single_doc", [11], 2, 2, 8),
    ("one_token", [1], 4, 2, 4),
    ("exact_mqa", [16, 8], 4, 1, 8),
    ("many_short", [1, 2, 3, 1, 1, 2], 2, 1, 4),
    ("empty_doc_tail", [6, 0], 2, 2, 4),
    ("filler_only", [0], 2, 1, 4),  # the trainer's padding-only micro-batch
]


# --------------------------------------------------------------------------------------------
# Hand-checked behaviour


def test_hand_checked_properties():
    # Document 0: real length 3, padded 4; document 1: real length 2, padded 2.
    cu_pad, cu_real = torch.tensor([0, 4, 6], dtype=torch.int32), torch.tensor([0, 3, 5], dtype=torch.int32)
    q = torch.randn(6, 2, 4)
    k = torch.randn(6, 1, 4)
    v = torch.randn(6, 1, 4)
    out = cp_attention(q, k, v, cu_pad, cu_real, None)
    # The first token of each document only sees itself: output = its own value (both heads).
    assert torch.allclose(out[0], v[0].expand(2, 4), atol=1e-6)
    assert torch.allclose(out[4], v[4].expand(2, 4), atol=1e-6)
    # Padding query (position 3 of document 0) outputs exactly zero.
    assert torch.equal(out[3], torch.zeros(2, 4))
    # Constant values inside a document → every real query of it outputs that constant.
    v2 = torch.zeros(6, 1, 4)
    v2[:4] = 3.0
    v2[3] = 1e6  # a padding key: must never be attended
    v2[4:] = -2.0
    out2 = cp_attention(q, k, v2, cu_pad, cu_real, None)
    assert torch.allclose(out2[:3], torch.full((3, 2, 4), 3.0))
    assert torch.allclose(out2[4:], torch.full((2, 2, 4), -2.0))


def test_document_isolation():
    cu_pad, cu_real = make_layout([5, 7], 2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(int(cu_pad[-1]), 2, 4, generator=g) for _ in range(3))
    base = [cp_attention_local(shard_for_cp(q, cu_pad, 2, r), k_all := _gathered(k, cu_pad, 2),
                               _gathered(v, cu_pad, 2), cu_pad, cu_real, 2, r) for r in range(2)]  # fmt: skip
    del k_all
    k2, v2 = k.clone(), v.clone()
    k2[int(cu_pad[1]) :] += 5.0  # perturb document 1 only
    v2[int(cu_pad[1]) :] -= 3.0
    pert = [
        cp_attention_local(
            shard_for_cp(q, cu_pad, 2, r),
            _gathered(k2, cu_pad, 2),
            _gathered(v2, cu_pad, 2),
            cu_pad,
            cu_real,
            2,
            r,
        )
        for r in range(2)
    ]
    full_base, full_pert = unshard_from_cp(base, cu_pad, 2), unshard_from_cp(pert, cu_pad, 2)
    d0 = slice(0, int(cu_pad[1]))
    assert torch.equal(full_base[d0], full_pert[d0])
    assert not torch.allclose(full_base[int(cu_pad[1]) :], full_pert[int(cu_pad[1]) :])


def _gathered(x, cu_pad, cp):
    """What an all-gather of the CP shards returns: the shards concatenated in rank order."""
    return torch.cat([shard_for_cp(x, cu_pad, cp, r) for r in range(cp)])


# --------------------------------------------------------------------------------------------
# Simulated CP ranks in one process


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(("name", "lengths", "hq", "hkv", "d"), CASES, ids=[c[0] for c in CASES])
def test_simulated_cp_matches_reference(cp, name, lengths, hq, hkv, d):
    ref = make_case(lengths, cp, hq, hkv, d, seed=hash(name) % 1000 + cp)
    cu_pad, cu_real = ref["cu_pad"], ref["cu_real"]
    q, k, v = (ref[n].float().requires_grad_() for n in "qkv")
    kg, vg = _gathered(k, cu_pad, cp), _gathered(v, cu_pad, cp)
    outs = [
        cp_attention_local(shard_for_cp(q, cu_pad, cp, r), kg, vg, cu_pad, cu_real, cp, r, backend="sdpa")
        for r in range(cp)
    ]
    out = unshard_from_cp(outs, cu_pad, cp)
    out.backward(ref["dout"].float())
    assert rel_err(out, ref["out"]) <= TOL_FP32
    for n in "qkv":
        err = rel_err(locals()[n].grad, ref["d" + n])
        assert err <= TOL_FP32, (n, err)
    # Padding queries are exactly zero.
    pad = torch.ones(out.shape[0], dtype=torch.bool)
    for i in range(len(cu_real) - 1):
        pad[int(cu_pad[i]) : int(cu_pad[i]) + int(cu_real[i + 1] - cu_real[i])] = False
    assert torch.count_nonzero(out[pad]) == 0


def test_cp1_identity_layout_matches_reference():
    # cp == 1 without padding takes the no-index fast path.
    lengths = [3, 9, 1, 4]
    ref = make_case(lengths, 1, 4, 2, 8, seed=3)
    assert torch.equal(ref["cu_pad"], ref["cu_real"])
    q, k, v = (ref[n].float().requires_grad_() for n in "qkv")
    out = cp_attention(q, k, v, ref["cu_pad"], ref["cu_real"], None, softmax_scale=None)
    out.backward(ref["dout"].float())
    assert rel_err(out, ref["out"]) <= TOL_FP32
    assert max(rel_err(t.grad, ref["d" + n]) for n, t in zip("qkv", (q, k, v))) <= TOL_FP32


def test_host_lists_accepted_and_scale():
    ref_cu_pad, ref_cu_real = [0, 4, 8], [0, 3, 7]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(8, 2, 4, generator=g) for _ in range(3))
    a = cp_attention(q, k, v, ref_cu_pad, ref_cu_real, None, softmax_scale=0.3)
    b = reference_attention(q.double(), k.double(), v.double(), ref_cu_pad, ref_cu_real, scale=0.3)
    assert rel_err(a, b) <= TOL_FP32


def test_bad_input():
    q, k = torch.zeros(8, 3, 4), torch.zeros(8, 2, 4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        cp_attention(q, k, k, [0, 8], [0, 8], None)
    q = torch.zeros(8, 2, 4)
    with pytest.raises(ValueError, match="GLOBAL cu_seqlens_padded"):
        cp_attention(q, k, k, [0, 16], [0, 16], None)
    with pytest.raises(ValueError, match="real length 9 must be in"):
        cp_attention(q, k, k, [0, 8], [0, 9], None)
    with pytest.raises(ValueError, match="both are \\[n\\+1\\]"):
        cp_attention(q, k, k, [0, 8], [0, 4, 8], None)
    with pytest.raises(ValueError, match="backend must be one of"):
        cp_attention(q, k, k, [0, 8], [0, 8], None, backend="flash")
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, RuntimeError), match="backend='varlen' needs"):
            cp_attention(q, k, k, [0, 8], [0, 8], None, backend="varlen")
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp"):
        cp_attention_local(q[:3], k[:6], k[:6], [0, 6], [0, 6], 2, 0)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        cp_attention_local(q[:4], k, k, [0, 8], [0, 8], 2, 2)


# --------------------------------------------------------------------------------------------
# Real process groups (gloo): one spawn per world size, shared by all checks


def _dist_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from megatron_hbp.cp import build_cp_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// from tests.distributed
    results: dict = {}
    try:
        degrees = [c for c in (1, 2, 4) if c <= world]
        # A degree that does not divide the world fails on every rank before any collective.
        try:
            build_cp_groups([1, 3], tp=1)
            results["bad_degree_error"] = ""
        except ValueError as e:
            results["bad_degree_error"] = str(e)
        if world == 4:  # layouts with tensor / pipeline parallelism (groups only)
            g_tp = build_cp_groups([1, 2], tp=2)
            results["tp2_c2"] = dist.get_process_group_ranks(g_tp.cp_group(2))
            results["tp2_dpcp"] = dist.get_process_group_ranks(g_tp.dp_cp_group)
            g_pp = build_cp_groups([2], pp=2)
            results["pp2_c2"] = dist.get_process_group_ranks(g_pp.cp_group(2))
        groups = build_cp_groups(degrees)
        results["dp_cp_ranks"] = dist.get_process_group_ranks(groups.dp_cp_group)
        for c in degrees:
            results[f"ranks_c{c}"] = dist.get_process_group_ranks(groups.cp_group(c))
            results[f"replica_c{c}"] = groups.replica_index(c)
            results[f"cprank_c{c}"] = groups.cp_rank(c)
        for c in degrees:
            group, r, rep = groups.cp_group(c), groups.cp_rank(c), groups.replica_index(c)
            for name, lengths, hq, hkv, d in CASES:
                # Different replicas of the same step get different data, like real training.
                ref = make_case(lengths, c, hq, hkv, d, seed=1000 * c + 17 * rep + len(name))
                cu_pad, cu_real = ref["cu_pad"], ref["cu_real"]
                q, k, v = (shard_for_cp(ref[n].float(), cu_pad, c, r).requires_grad_() for n in "qkv")
                out = cp_attention(q, k, v, cu_pad, cu_real, group)
                (out * shard_for_cp(ref["dout"].float(), cu_pad, c, r)).sum().backward()
                errs = {"out": rel_err(out, shard_for_cp(ref["out"], cu_pad, c, r))}
                for n, t in zip("qkv", (q, k, v)):
                    want = shard_for_cp(ref["d" + n], cu_pad, c, r)
                    # A rank whose shard is all padding must get exactly zero gradients.
                    errs["d" + n] = (
                        rel_err(t.grad, want) if want.abs().max() > 0 else float(t.grad.abs().max())
                    )
                results[f"{name}_c{c}"] = errs
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return results


def _spawn(world: int, worker=None) -> list[dict]:
    """Run ``worker(rank, world) -> dict`` (default: this module's) on ``world`` gloo processes
    (tests/distributed.py); return each rank's dict."""
    return run_ranks(world, worker or _dist_worker, timeout=600)


@pytest.fixture(scope="module")
def dist2():
    return _spawn(2)


@pytest.fixture(scope="module")
def dist4():
    return _spawn(4)


@pytest.mark.slow
def test_groups_4_processes(dist4):
    for rank, res in enumerate(dist4):
        assert res["dp_cp_ranks"] == [0, 1, 2, 3]
        assert res["ranks_c1"] == [rank]
        assert res["ranks_c2"] == [0, 1] if rank < 2 else [2, 3]
        assert res["ranks_c4"] == [0, 1, 2, 3]
        assert (res["replica_c2"], res["cprank_c2"]) == (rank // 2, rank % 2)
        assert (res["replica_c4"], res["cprank_c4"]) == (0, rank)
        assert "CP degree 3 does not divide" in res["bad_degree_error"]
        # tp = 2: DP x CP ranks of tp_rank t are t and t + 2; pp = 2: stages are [0, 1] and [2, 3].
        assert res["tp2_c2"] == res["tp2_dpcp"] == [rank % 2, rank % 2 + 2]
        assert res["pp2_c2"] == ([0, 1] if rank < 2 else [2, 3])


@pytest.mark.slow
@pytest.mark.parametrize("c", [1, 2, 4])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_cp_attention_4_processes(dist4, c, name):
    for rank, res in enumerate(dist4):
        errs = res[f"{name}_c{c}"]
        assert max(errs.values()) <= TOL_FP32, (rank, errs)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_cp_attention_2_processes(dist2, name):
    for rank, res in enumerate(dist2):
        assert res["ranks_c2"] == [0, 1]
        for c in (1, 2):
            errs = res[f"{name}_c{c}"]
            assert max(errs.values()) <= TOL_FP32, (rank, c, errs)


# --------------------------------------------------------------------------------------------
# GPU: varlen flash attention path against the SDPA path (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_varlen_backend_matches_sdpa_cuda(cp):
    from megatron_hbp.cp import varlen_attn_available

    if not varlen_attn_available():
        pytest.skip("torch.nn.attention.varlen missing")
    from megatron_hbp.cp.attention import _varlen_bottom_right_ok

    lengths = [37, 1, 300, 64, 5]
    ref = make_case(lengths, cp, 8, 2, 64, seed=cp)
    cu_pad, cu_real = ref["cu_pad"], ref["cu_real"]
    dev = torch.device("cuda")
    # The CP chunks rely on flash attention's bottom-right causal alignment (q_len < k_len).
    assert _varlen_bottom_right_ok(dev, torch.bfloat16)
    errs = {}
    for dtype in (torch.bfloat16,):
        q, k, v = (ref[n].to(dev, dtype).requires_grad_() for n in "qkv")
        kg, vg = _gathered(k, cu_pad, cp), _gathered(v, cu_pad, cp)
        outs = [
            cp_attention_local(
                shard_for_cp(q, cu_pad, cp, r), kg, vg, cu_pad, cu_real, cp, r, backend="varlen"
            )
            for r in range(cp)
        ]
        out = unshard_from_cp(outs, cu_pad, cp)
        out.backward(ref["dout"].to(dev, dtype))
        errs["out"] = rel_err(out.cpu(), ref["out"])
        for n, t in zip("qkv", (q, k, v)):
            errs["d" + n] = rel_err(t.grad.cpu(), ref["d" + n])
        # torch's own bf16 error (SDPA per document in bf16) as the yardstick (2x rule).
        q2, k2, v2 = (ref[n].to(dev, dtype) for n in "qkv")
        base = reference_attention(q2.float(), k2.float(), v2.float(), cu_pad, cu_real).to(dtype)
        torch_err = max(rel_err(base.cpu(), ref["out"]), 4e-3)
        assert errs["out"] <= 2 * torch_err, errs
        assert max(errs.values()) <= 2e-2, errs


@pytest.mark.parametrize(
    ("on_cuda", "half", "varlen", "te", "want"),
    [
        (True, True, True, True, "te"),
        (True, True, True, False, "varlen"),
        (True, True, False, False, "sdpa"),
        (True, False, True, True, "sdpa"),  # fp32: no flash kernel
        (False, True, True, True, "sdpa"),  # CPU
    ],
)
def test_auto_attention_backend_is_one_rule(on_cuda, half, varlen, te, want):
    """The CP attention's ``auto`` and the trainer's (``mcore.attention.resolve_backend``) are one rule."""
    from megatron_hbp.cp import auto_attention_backend

    assert (
        auto_attention_backend(on_cuda=on_cuda, half=half, varlen_available=varlen, te_available=te) == want
    )
    pytest.importorskip("megatron.core")
    from megatron_hbp.mcore.attention import resolve_backend

    dtype = torch.bfloat16 if half else torch.float32
    got = resolve_backend("auto", on_cuda=on_cuda, dtype=dtype, te_available=te, varlen_available=varlen)
    assert got == want
