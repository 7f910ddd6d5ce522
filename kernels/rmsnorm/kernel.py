"""Triton RMSNorm forward/backward, optionally fused with the residual add.

Forward, per row ``i`` of ``x [N, H]`` (``h = x + residual`` when fused; ``h`` is rounded to
the input dtype and also returned, as the unfused add would give it)::

    rstd_i = rsqrt(mean_j h_ij² + eps)          (fp32, saved: N floats)
    y_ij   = h_ij · rstd_i · w_j                (fp32 math, stored in the input dtype)

Backward with ``x̂ = h · rstd`` and ``g = dy · w``::

    dh_ij = rstd_i · (g_ij − x̂_ij · mean_j(g_ij · x̂_ij)) (+ dh_out_ij when fused)
    dw_j  = Σ_i dy_ij · x̂_ij

``dw`` is reduced in fp32: each program of the backward grid loops over row blocks
(``pid, pid + grid, ...``), keeps a ``[H]`` fp32 partial sum in registers and writes it to
row ``pid`` of a ``[grid, H]`` fp32 buffer; one ``sum(0)`` in fp32 finishes it, then it is
cast to the weight dtype. The residual gradient equals ``dh`` (``d(x + r)/dr = 1``).

Tiles are ``[BLOCK_ROWS, BLOCK_H]`` with ``BLOCK_H = next_pow2(H)`` (a whole row in
registers; H ≤ 65536) and ``BLOCK_ROWS`` rows so that one tile holds ~4-8K elements (the
interpreter runs one program at a time; on the GPU small hidden sizes also need several
rows per program to keep the SMs busy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rounding import to_output
from ..utils import alloc_output as _alloc
from ..utils import cdiv, num_sms

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HIDDEN = 65536


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    y_ptr,
    h_ptr,
    rstd_ptr,
    N,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_H)
    mask_r = rows < N
    mask_c = cols < H
    mask = mask_r[:, None] & mask_c[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    h = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        h = to_output(h.to(tl.float32) + r.to(tl.float32), h.dtype)  # rounded like the unfused add
        tl.store(h_ptr + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    y = hf * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, to_output(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,
    h_ptr,
    w_ptr,
    rstd_ptr,
    dho_ptr,
    dh_ptr,
    dw_partial_ptr,
    N,
    H,
    HAS_DRES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    mask_c = cols < H
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    n_blocks = tl.cdiv(N, BLOCK_ROWS)
    for block in range(pid, n_blocks, n_programs):
        rows = block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        mask_r = rows < N
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        hf = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
        xhat = hf * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / H
        dh = rstd[:, None] * (g - xhat * c[:, None])
        if HAS_DRES:
            dh += tl.load(dho_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + offs, to_output(dh, dh_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * H + cols, dw_acc, mask=mask_c)


def _blocks(H: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_H, num_warps) for hidden size ``H``."""
    block_h = triton.next_power_of_2(H)
    block_rows = max(1, min(16, 4096 // block_h))
    num_warps = min(16, max(4, block_rows * block_h // 1024))
    return block_rows, block_h, num_warps


def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float, residual2d: torch.Tensor | None):
    """Launch the forward on contiguous ``[N, H]`` rows: ``(y, h or None, rstd [N] fp32)``."""
    N, H = x2d.shape
    block_rows, block_h, num_warps = _blocks(H, x2d.device)
    y = _alloc((N, H), x2d.dtype, x2d.device)
    h = _alloc((N, H), x2d.dtype, x2d.device) if residual2d is not None else None
    rstd = _alloc((N,), torch.float32, x2d.device)
    if N:
        _rmsnorm_fwd_kernel[(cdiv(N, block_rows),)](
            x2d,
            residual2d if residual2d is not None else x2d,
            weight,
            y,
            h if h is not None else y,
            rstd,
            N,
            H,
            float(eps),
            HAS_RESIDUAL=residual2d is not None,
            BLOCK_ROWS=block_rows,
            BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return y, h, rstd


def rms_norm_bwd(dy2d, h2d, weight, rstd, dh_out2d, *, grid: int | None = None):
    """Launch the backward: ``(dh [N, H] in h's dtype, dw [H] in weight's dtype)``.

    ``grid`` (tests) overrides the number of programs that split the rows (default: 4 per SM
    on CUDA, capped by the number of row blocks; 1 in the interpreter).
    """
    N, H = h2d.shape
    block_rows, block_h, num_warps = _blocks(H, h2d.device)
    n_blocks = cdiv(N, block_rows)
    if grid is None:
        grid = min(4 * num_sms(h2d.device), n_blocks)
    grid = max(1, min(grid, max(n_blocks, 1)))
    dh = _alloc((N, H), h2d.dtype, h2d.device)
    dw_partial = _alloc((grid, H), torch.float32, h2d.device)
    _rmsnorm_bwd_kernel[(grid,)](
        dy2d,
        h2d,
        weight,
        rstd,
        dh_out2d if dh_out2d is not None else dy2d,
        dh,
        dw_partial,
        N,
        H,
        HAS_DRES=dh_out2d is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return dh, dw_partial.sum(0).to(weight.dtype)
