"""RoPE on packed THD q/k (per-token positions) against the fp32 PyTorch reference.

Positions are built the way the trainer builds them (0, 1, ... restarting per document)
for one document, many length-1 documents, mixed lengths, Llama-3 scaled frequencies with
positions up to 131071, and a zigzag context-parallel shard. Token counts cross BLOCK_T,
head_dim covers 64 ... 256 (hidden size = heads x head_dim from 64 to 8192); outputs start
as NaN. Errors are max |got - ref| / max |ref|.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_hbp.kernels import rope, rope_qk, rope_reference
from megatron_hbp.kernels import utils as kernel_utils

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def rel_err(got, ref) -> float:
    assert not torch.isnan(got).any(), "NaN in output: a poisoned element was never written"
    return ((got.float().cpu() - ref.float().cpu()).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def positions_of(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])


def inv_freq_of(head_dim: int, theta: float = 10000.0, llama3: dict | None = None) -> torch.Tensor:
    """HF ``_compute_llama3_parameters`` written out independently of the trainer's code."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if llama3:
        factor, lo, hi, old = llama3["factor"], llama3["low"], llama3["high"], llama3["old"]
        out = []
        for f in inv.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = torch.tensor(out, dtype=torch.float64)
    return inv.float()


def make(T, hq, hk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, hq, d, generator=gen).to(dtype)
    k = torch.randn(T, hk, d, generator=gen).to(dtype)
    dq = torch.randn(T, hq, d, generator=gen).to(dtype)
    dk = torch.randn(T, hk, d, generator=gen).to(dtype)
    return q, k, dq, dk


def run_ours(q, k, pos, inv, dq, dk, **kw):
    qs = q.detach().clone().to(DEVICE).requires_grad_()
    ks = k.detach().clone().to(DEVICE).requires_grad_()
    qo, ko = rope_qk(qs, ks, pos.to(DEVICE), inv.to(DEVICE), backend="triton", **kw)
    torch.autograd.backward([qo, ko], [dq.to(DEVICE), dk.to(DEVICE)])
    return [t.detach().cpu() for t in (qo, ko, qs.grad, ks.grad)]


def run_ref(q, k, pos, inv, dq, dk, dtype=torch.float32):
    """The reference per tensor; ``dtype=float32`` upcasts the inputs (the exact answer)."""
    qs = q.detach().clone().to(dtype).requires_grad_()
    ks = k.detach().clone().to(dtype).requires_grad_()
    qo, ko = rope_reference(qs, pos, inv), rope_reference(ks, pos, inv)
    torch.autograd.backward([qo, ko], [dq.to(dtype), dk.to(dtype)])
    return [t.detach() for t in (qo, ko, qs.grad, ks.grad)]


LLAMA3 = {"factor": 8.0, "low": 1.0, "high": 4.0, "old": 8192}
CASES = {
    "one_document": ([77], 4, 2, 64, None),
    "length1_documents": ([1] * 45, 2, 1, 64, None),
    "mixed_documents": ([1, 13, 2, 40, 1, 7], 3, 1, 128, None),
    "head_dim_256": ([19, 20], 2, 2, 256, None),
    "hidden_8192": ([9], 64, 8, 128, None),
    "llama3_long": ([3, 1, 5], 2, 1, 128, LLAMA3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case):
    lengths, hq, hk, d, llama3 = CASES[case]
    pos = positions_of(lengths)
    if case == "llama3_long":
        pos = pos + torch.tensor([0, 0, 0, 131070, 5000, 70000, 100000, 131066, 8191])
    inv = inv_freq_of(d, 500000.0 if llama3 else 10000.0, llama3)
    q, k, dq, dk = make(pos.numel(), hq, hk, d, torch.float32, seed=len(lengths))
    got = run_ours(q, k, pos, inv, dq, dk)
    ref = run_ref(q, k, pos, inv, dq, dk)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert rel_err(g, r) <= 1e-5


def test_bf16_within_twice_torch_error():
    pos = positions_of([1, 1, 30, 5, 1, 64])
    inv = inv_freq_of(128)
    q, k, dq, dk = make(pos.numel(), 4, 2, 128, torch.bfloat16, seed=7)
    got = run_ours(q, k, pos, inv, dq, dk)
    ref = run_ref(q, k, pos, inv, dq, dk)
    torch_bf16 = run_ref(q, k, pos, inv, dq, dk, dtype=torch.bfloat16)  # the trainer's unfused path
    for g, t, r in zip(got, torch_bf16, ref):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, r) <= 2 * rel_err(t, r)


def zigzag_index(padded_lengths, cp: int, rank: int) -> torch.Tensor:
    """Token indices of CP rank ``rank``: per document (padded to 2cp chunks) chunks
    ``rank`` and ``2cp - 1 - rank``."""
    idx, start = [], 0
    for n in padded_lengths:
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            idx.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
        start += n
    return torch.cat(idx)


def test_context_parallel_shard_equals_slice_of_full():
    padded = [8, 24, 16, 8]  # multiples of 2 * cp
    cp = 4
    pos = positions_of(padded)
    inv = inv_freq_of(64, llama3=LLAMA3)
    q, k, dq, dk = make(pos.numel(), 2, 1, 64, torch.float32, seed=11)
    full = run_ref(q, k, pos, inv, dq, dk)
    covered = torch.zeros(pos.numel(), dtype=torch.bool)
    for rank in range(cp):
        idx = zigzag_index(padded, cp, rank)
        covered[idx] = True
        got = run_ours(q[idx], k[idx], pos[idx], inv, dq[idx], dk[idx])
        for g, f in zip(got, full):
            assert rel_err(g, f[idx]) <= 1e-5
    assert covered.all()


def test_strided_views_of_fused_qkv():
    """q/k as Megatron splits them from the fused QKV output (non-contiguous views)."""
    T, groups, per_group, d = 21, 2, 2, 64
    pos = positions_of([4, 17])
    inv = inv_freq_of(d)
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, groups, (per_group + 2) * d, generator=gen).to(DEVICE)
    q = qkv[..., : per_group * d].reshape(T, groups * per_group, d)
    k = qkv[..., per_group * d : (per_group + 1) * d]
    assert not k.is_contiguous()
    qo, ko = rope_qk(q, k, pos.to(DEVICE), inv.to(DEVICE), backend="triton")
    assert rel_err(qo, rope_reference(q.cpu(), pos, inv)) <= 1e-5
    assert rel_err(ko, rope_reference(k.cpu(), pos, inv)) <= 1e-5


def test_single_tensor_and_int32_positions_and_zero_tokens():
    pos = positions_of([5, 6]).to(torch.int32)
    inv = inv_freq_of(64)
    x = torch.randn(11, 3, 64)
    got = rope(x.to(DEVICE), pos.to(DEVICE), inv.to(DEVICE), backend="triton")
    assert rel_err(got, rope_reference(x, pos, inv)) <= 1e-5
    # Position 0 is the identity (cos 0 = 1, sin 0 = 0), exactly.
    assert torch.equal(got[0].cpu(), x[0])
    empty = torch.randn(0, 2, 64).to(DEVICE)
    qo, ko = rope_qk(
        empty, empty, torch.zeros(0, dtype=torch.int64, device=DEVICE), inv.to(DEVICE), backend="triton"
    )
    assert qo.shape == ko.shape == (0, 2, 64)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 2, 64), torch.randn(4, 1, 32), torch.arange(4), torch.ones(32)), "must match q"),
        ((torch.randn(4, 2, 63), torch.randn(4, 1, 63), torch.arange(4), torch.ones(31)), "even"),
        ((torch.randn(4, 2, 64), torch.randn(4, 1, 64), torch.arange(5), torch.ones(32)), "positions"),
        ((torch.randn(4, 2, 64), torch.randn(4, 1, 64), torch.arange(4.0), torch.ones(32)), "positions"),
        (
            (torch.randn(4, 2, 64), torch.randn(4, 1, 64), torch.arange(4), torch.ones(32).double()),
            "inv_freq",
        ),
        ((torch.randn(4, 128), torch.randn(4, 1, 64), torch.arange(4), torch.ones(32)), r"\[T, heads"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        rope_qk(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_large_fp32_and_bf16():
    """16K tokens of 15 documents, 32/8 heads x 64, Llama-3 frequencies, compiled."""
    gen = torch.Generator().manual_seed(0)
    cuts = sorted(torch.randperm(16383, generator=gen)[:14].add(1).tolist())
    pos = positions_of([b - a for a, b in zip([0, *cuts], [*cuts, 16384])])
    inv = inv_freq_of(64, 500000.0, {"factor": 32.0, "low": 1.0, "high": 4.0, "old": 8192})
    for dtype in (torch.float32, torch.bfloat16):
        q, k, dq, dk = make(16384, 32, 8, 64, dtype, seed=3)
        got = run_ours(q, k, pos, inv, dq, dk)
        ref = run_ref(q, k, pos, inv, dq, dk)
        tor = run_ref(q, k, pos, inv, dq, dk, dtype=dtype)
        for g, t, r in zip(got, tor, ref):
            bound = 1e-5 if dtype == torch.float32 else 2 * rel_err(t, r)
            assert rel_err(g, r) <= bound
