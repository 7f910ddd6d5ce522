"""SwiGLU ``silu(gate) * up`` on ``[gate | up]`` against the fp32 PyTorch reference.

Triton runs compiled on CUDA and in the interpreter on CPU. Shapes cross block edges (rows
not a multiple of BLOCK_ROWS, F not a multiple of BLOCK_F = min(1024, next_pow2(F)), F from
64 to 8192); outputs start as NaN. Errors are max |got - ref| / max |ref|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hbp.kernels import SwiGLU, swiglu, swiglu_reference
from megatron_hbp.kernels import utils as kernel_utils

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def rel_err(got, ref) -> float:
    assert not torch.isnan(got).any(), "NaN in output: a poisoned element was never written"
    return ((got.float().cpu() - ref.float().cpu()).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def make(N, F_, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, 2 * F_, generator=gen) * 3).to(dtype)  # gates well into both tails
    dout = torch.randn(N, F_, generator=gen).to(dtype)
    return z, dout


def run(fn, z, dout, device, **kw):
    zs = z.detach().clone().to(device).requires_grad_()
    out = fn(zs, **kw)
    out.backward(dout.to(device))
    return out.detach().cpu(), zs.grad.cpu()


def megatron_glu_bf16(z):
    """Megatron MLP's unfused GLU in the activation dtype."""
    gate, up = torch.chunk(z, 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("N,F_", [(1, 64), (33, 64), (7, 1000), (5, 1536), (2, 8192)], ids=lambda v: str(v))
def test_fp32_matches_reference(N, F_):
    z, dout = make(N, F_, torch.float32, seed=N + F_)
    out, dz = run(swiglu, z, dout, DEVICE, backend="triton")
    ref_out, ref_dz = run(swiglu_reference, z, dout, "cpu")
    assert out.shape == (N, F_) and dz.shape == (N, 2 * F_)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(dz, ref_dz) <= 1e-5


@pytest.mark.parametrize("N,F_", [(33, 64), (7, 1000), (2, 8192)], ids=lambda v: str(v))
def test_bf16_within_twice_torch_error(N, F_):
    z, dout = make(N, F_, torch.bfloat16, seed=N * F_)
    out, dz = run(swiglu, z, dout, DEVICE, backend="triton")
    ref_out, ref_dz = run(swiglu_reference, z.float(), dout.float(), "cpu")
    t_out, t_dz = run(megatron_glu_bf16, z, dout, "cpu")
    assert out.dtype == dz.dtype == torch.bfloat16
    assert rel_err(out, ref_out) <= 2 * rel_err(t_out, ref_out)
    assert rel_err(dz, ref_dz) <= 2 * rel_err(t_dz, ref_dz)


def test_leading_dims_and_module():
    z, dout = make(12, 40, torch.float32, seed=1)
    z3, d3 = z.view(4, 3, 80), dout.view(4, 3, 40)
    out, dz = run(SwiGLU(backend="triton"), z3, d3, DEVICE)
    ref_out, ref_dz = run(swiglu_reference, z3, d3, "cpu")
    assert out.shape == (4, 3, 40) and dz.shape == (4, 3, 80)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(dz, ref_dz) <= 1e-5


def test_hand_computed_values():
    # silu(0) * 5 = 0, silu(2) * 1 = 2 * sigmoid(2), silu(-1) * -3 = 3 * sigmoid(-1).
    z = torch.tensor([[0.0, 2.0, -1.0, 5.0, 1.0, -3.0]]).to(DEVICE)
    out = swiglu(z, backend="triton").cpu()
    s2, sm1 = 1 / (1 + torch.exp(torch.tensor(-2.0))), 1 / (1 + torch.exp(torch.tensor(1.0)))
    torch.testing.assert_close(
        out, torch.stack([torch.tensor(0.0), 2 * s2, 3 * sm1])[None], rtol=1e-6, atol=0
    )


def test_zero_rows():
    assert swiglu(torch.randn(0, 16).to(DEVICE), backend="triton").shape == (0, 8)


@pytest.mark.parametrize(
    "z,match",
    [(torch.randn(3, 7), r"\[\.\.\., 2F\]"), (torch.randn(3, 8).double(), "dtype")],
)
def test_bad_inputs_raise(z, match):
    with pytest.raises(ValueError, match=match):
        swiglu(z)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_large_bf16():
    """The ~1B model's MLP at 16K tokens, compiled: within 2x Megatron's unfused bf16 GLU error."""
    z, dout = make(16384, 8192, torch.bfloat16, seed=2)
    out, dz = run(swiglu, z, dout, "cuda")
    ref_out, ref_dz = run(swiglu_reference, z.float(), dout.float(), "cuda")
    t_out, t_dz = run(megatron_glu_bf16, z, dout, "cuda")
    assert rel_err(out, ref_out) <= 2 * rel_err(t_out, ref_out)
    assert rel_err(dz, ref_dz) <= 2 * rel_err(t_dz, ref_dz)
