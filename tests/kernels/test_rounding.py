"""``kernels/rounding.py:to_output`` rounds fp32 -> bf16 to nearest even, like the GPU and torch,
also in the interpreter (where a plain ``.to(tl.bfloat16)`` truncates)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_hbp.kernels.rounding import to_output

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, to_output(x, y_ptr.dtype.element_ty), mask=mask)


def test_round_to_nearest_even_matches_torch():
    gen = torch.Generator().manual_seed(0)
    one = torch.tensor([1.0]).view(torch.int32)
    # Exact ties (low 16 bits 0x8000) with even and odd kept mantissas, just below/above ties,
    # negatives, tiny and large magnitudes, and random values.
    specials = torch.tensor(
        [one.item() + 0x8000, one.item() + 0x18000, one.item() + 0x7FFF, one.item() + 0x8001],
        dtype=torch.int32,
    ).view(torch.float32)
    x = torch.cat(
        [specials, -specials, torch.tensor([0.0, 1e-30, 3e38, -2.5]), torch.randn(200, generator=gen)]
    )
    y = torch.full((x.numel(),), float("nan"), dtype=torch.bfloat16)
    _cast_kernel[(1,)](
        x.to(DEVICE), y_dev := y.to(DEVICE), x.numel(), BLOCK=triton.next_power_of_2(x.numel())
    )
    expected = x.to(torch.bfloat16)
    assert torch.equal(y_dev.cpu().view(torch.int16), expected.view(torch.int16))
    # The inputs are not trivial: truncating them (what the interpreter's plain cast does) differs.
    truncated = (x.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert not torch.equal(truncated.view(torch.int16), expected.view(torch.int16))
