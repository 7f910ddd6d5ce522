"""RMSNorm (plain and fused with the residual add) against the fp32 PyTorch reference.

Triton runs compiled on CUDA and in the interpreter on CPU (root conftest sets
TRITON_INTERPRET=1). Shapes cross block edges (rows not a multiple of BLOCK_ROWS, hidden
sizes not powers of two, 64 ... 8192); every buffer a kernel must fill starts as NaN.
Errors are max |got - ref| / max |ref| against the reference run in fp32 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hbp.kernels import RMSNorm, rms_norm, rms_norm_reference
from megatron_hbp.kernels import utils as kernel_utils
from megatron_hbp.kernels.rmsnorm import kernel as rms_kernel

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output: a poisoned element was never written"
    return ((got.float().cpu() - ref.float().cpu()).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(N, H, dtype, seed=0, residual=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, H, generator=gen) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(H, generator=gen)).to(dtype)
    r = (torch.randn(N, H, generator=gen)).to(dtype) if residual else None
    dy = torch.randn(N, H, generator=gen).to(dtype)
    dh = torch.randn(N, H, generator=gen).to(dtype) if residual else None
    return x, w, r, dy, dh


def run(fn, x, w, r, dy, dh, device, **kw):
    """Forward + backward of ``fn`` on leaf copies; returns outputs and gradients on CPU."""
    xs = x.detach().clone().to(device).requires_grad_()
    ws = w.detach().clone().to(device).requires_grad_()
    rs = r.detach().clone().to(device).requires_grad_() if r is not None else None
    out = fn(xs, ws, 1e-5, residual=rs, **kw)
    if r is None:
        torch.autograd.backward([out], [dy.to(device)])
        return [out.detach().cpu()], [xs.grad.cpu(), ws.grad.cpu()]
    y, h = out
    torch.autograd.backward([y, h], [dy.to(device), dh.to(device)])
    return [y.detach().cpu(), h.detach().cpu()], [xs.grad.cpu(), ws.grad.cpu(), rs.grad.cpu()]


def reference_fp32(x, w, r, dy, dh):
    f = lambda t: t.float() if t is not None else None  # noqa: E731
    return run(rms_norm_reference, f(x), f(w), f(r), f(dy), f(dh), "cpu")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(
    "N,H", [(1, 64), (37, 64), (23, 96), (9, 1000), (5, 4096), (3, 8192)], ids=lambda v: str(v)
)
def test_fp32_matches_reference(N, H, residual):
    x, w, r, dy, dh = make(N, H, torch.float32, seed=N * H, residual=residual)
    outs, grads = run(rms_norm, x, w, r, dy, dh, DEVICE, backend="triton")
    ref_outs, ref_grads = reference_fp32(x, w, r, dy, dh)
    for got, ref in zip(outs + grads, ref_outs + ref_grads):
        assert got.dtype == torch.float32
        assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("N,H", [(37, 64), (9, 1000), (3, 8192)], ids=lambda v: str(v))
def test_bf16_within_twice_torch_error(N, H, residual):
    x, w, r, dy, dh = make(N, H, torch.bfloat16, seed=N + H, residual=residual)
    outs, grads = run(rms_norm, x, w, r, dy, dh, DEVICE, backend="triton")
    ref_outs, ref_grads = reference_fp32(x, w, r, dy, dh)

    # Torch eager in bf16: what the trainer's torch path runs (torch.nn.RMSNorm, bf16 add).
    def torch_bf16(x, w, eps, residual=None):
        h = x if residual is None else x + residual
        y = F.rms_norm(h, (h.shape[-1],), w, eps)
        return y if residual is None else (y, h)

    t_outs, t_grads = run(torch_bf16, x, w, r, dy, dh, "cpu")
    for got, tor, ref in zip(outs + grads, t_outs + t_grads, ref_outs + ref_grads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, ref) <= 2 * rel_err(tor, ref)


def test_dweight_reduced_over_many_programs():
    """Rows split over 5 programs (several row blocks each, a ragged last block): dw is the
    fp32 sum of the per-program partial sums."""
    N, H = 203, 48
    x, w, _, dy, _ = make(N, H, torch.float32, seed=3)
    h2d = x.to(DEVICE)
    _, _, rstd = rms_kernel.rms_norm_fwd(h2d, w.to(DEVICE), 1e-5, None)
    dh, dw = rms_kernel.rms_norm_bwd(dy.to(DEVICE), h2d, w.to(DEVICE), rstd, None, grid=5)
    _, (ref_dx, ref_dw) = reference_fp32(x, w, None, dy, None)
    assert rel_err(dh, ref_dx) <= 1e-5
    assert rel_err(dw, ref_dw) <= 1e-5


def test_module_matches_torch_rmsnorm_and_state_dict():
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(40, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    mod = RMSNorm(40, eps=1e-6, backend="triton")
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == ["weight"]
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(mod.to(DEVICE)(x.to(DEVICE)).cpu(), ref(x), rtol=1e-5, atol=1e-6)


def test_zero_rows_and_3d_input():
    x = torch.randn(0, 64)
    w = torch.ones(64)
    assert rms_norm(x.to(DEVICE), w.to(DEVICE), backend="triton").shape == (0, 64)
    x3 = torch.randn(4, 3, 64)
    got = rms_norm(x3.to(DEVICE), w.to(DEVICE), backend="triton").cpu()
    assert rel_err(got, rms_norm_reference(x3, w)) <= 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(x=torch.randn(4, 8), weight=torch.ones(7)), "weight shape"),
        (dict(x=torch.randn(4, 8).double(), weight=torch.ones(8)), "dtype"),
        (dict(x=torch.randn(4, 8), weight=torch.ones(8), residual=torch.randn(4, 9)), "residual"),
        (dict(x=torch.randn(4, 8), weight=torch.ones(8), eps=0.0), "eps"),
        (dict(x=torch.randn(4, 8), weight=torch.ones(8), backend="cuda"), "backend"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rms_norm(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gpu_large_bf16(residual):
    """The ~1B model's shape at 16K tokens, compiled: within 2x torch eager's bf16 error."""
    x, w, r, dy, dh = make(16384, 2048, torch.bfloat16, seed=1, residual=residual)
    outs, grads = run(rms_norm, x, w, r, dy, dh, "cuda")

    def torch_bf16(x, w, eps, residual=None):
        h = x if residual is None else x + residual
        y = F.rms_norm(h, (h.shape[-1],), w, eps)
        return y if residual is None else (y, h)

    t_outs, t_grads = run(torch_bf16, x, w, r, dy, dh, "cuda")
    ref_outs, ref_grads = run(
        rms_norm_reference, *(t.cuda().float() if t is not None else None for t in (x, w, r, dy, dh)), "cuda"
    )
    for got, tor, ref in zip(outs + grads, t_outs + t_grads, ref_outs + ref_grads):
        assert rel_err(got, ref) <= 2 * rel_err(tor, ref)
