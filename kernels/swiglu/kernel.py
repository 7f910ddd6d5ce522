"""Triton SwiGLU forward/backward on ``z = [gate | up]`` rows.

Forward (fp32 math, one rounding to the output dtype)::

    s = sigmoid(gate);  out = gate · s · up

Backward, with ``dout`` the incoming gradient::

    d up   = dout · gate · s
    d gate = dout · up · s · (1 + gate · (1 − s))

written into one ``dz [N, 2F]`` (the gradient of ``linear_fc1``'s output). Tiles are
``[BLOCK_ROWS, BLOCK_F]`` over a 2-D grid (row blocks x column blocks), so any F works and a
row never needs to fit in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import to_output
from ..utils import alloc_output as _alloc
from ..utils import cdiv

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _swiglu_fwd_kernel(z_ptr, o_ptr, N, F, BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z_offs = rows64 * (2 * F) + cols[None, :]
    gate = tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(z_ptr + z_offs + F, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(o_ptr + rows64 * F + cols[None, :], to_output(out, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(z_ptr, dout_ptr, dz_ptr, N, F, BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    z_offs = rows64 * (2 * F) + cols[None, :]
    gate = tl.load(z_ptr + z_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(z_ptr + z_offs + F, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + rows64 * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    silu = gate * s
    d_up = dout * silu
    d_gate = dout * up * s * (1.0 + gate * (1.0 - s))
    tl.store(dz_ptr + z_offs, to_output(d_gate, dz_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + z_offs + F, to_output(d_up, dz_ptr.dtype.element_ty), mask=mask)


def _blocks(F: int) -> tuple[int, int, int]:
    block_f = min(1024, triton.next_power_of_2(F))
    block_rows = max(1, min(32, 4096 // block_f))
    return block_rows, block_f, 4


def swiglu_fwd(z2d: torch.Tensor) -> torch.Tensor:
    N, F2 = z2d.shape
    F = F2 // 2
    out = _alloc((N, F), z2d.dtype, z2d.device)
    block_rows, block_f, num_warps = _blocks(F)
    if N and F:
        grid = (cdiv(N, block_rows), cdiv(F, block_f))
        _swiglu_fwd_kernel[grid](z2d, out, N, F, BLOCK_ROWS=block_rows, BLOCK_F=block_f, num_warps=num_warps)
    return out


def swiglu_bwd(z2d: torch.Tensor, dout2d: torch.Tensor) -> torch.Tensor:
    N, F2 = z2d.shape
    F = F2 // 2
    dz = _alloc((N, F2), z2d.dtype, z2d.device)
    block_rows, block_f, num_warps = _blocks(F)
    if N and F:
        grid = (cdiv(N, block_rows), cdiv(F, block_f))
        _swiglu_bwd_kernel[grid](
            z2d, dout2d, dz, N, F, BLOCK_ROWS=block_rows, BLOCK_F=block_f, num_warps=num_warps
        )
    return dz
