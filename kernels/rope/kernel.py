"""Triton RoPE for q and k of packed THD tensors in one launch, forward and backward.

Each program takes ``BLOCK_T`` tokens, loads their positions (``[T]`` int32/int64, any
order: documents restart at 0, CP shards are arbitrary subsets) and computes
``cos``/``sin`` of ``fp32(pos) · inv_freq`` once into a ``[BLOCK_T, BLOCK_HALF]`` tile, then
loops over the query heads and the key heads, rotating each ``(x1, x2)`` half-pair in fp32.
The backward is the transposed rotation (``sin → −sin``), so the same kernel with
``SIGN = −1`` maps the output gradients to the input gradients; nothing but the positions
and ``inv_freq`` is saved. Inputs may be strided views over the token and head dims (the
q/k views Megatron splits from the fused QKV projection); the last dim must be contiguous.
Outputs are new contiguous ``[T, H, D]`` tensors.
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
def _rotate_heads(
    x_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    n_heads,
    offs_t64,
    offs_d,
    mask,
    cos,
    sin,
    HALF,
    stride_ot,
    stride_oh,
):
    for head in range(0, n_heads):
        x_offs = offs_t64[:, None] * stride_xt + head * stride_xh + offs_d[None, :]
        x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
        o_offs = offs_t64[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        o1 = x1 * cos - x2 * sin
        o2 = x2 * cos + x1 * sin
        tl.store(out_ptr + o_offs, to_output(o1, out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o_offs + HALF, to_output(o2, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    inv_freq_ptr,
    T,
    HQ,
    HK,
    HALF,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    SIGN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_t = offs_t < T
    mask_d = offs_d < HALF
    mask = mask_t[:, None] & mask_d[None, :]
    pos = tl.load(pos_ptr + offs_t, mask=mask_t, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + offs_d, mask=mask_d, other=0.0)
    angle = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(angle)
    sin = tl.sin(angle) * SIGN
    offs_t64 = offs_t.to(tl.int64)
    # Outputs are contiguous [T, H, 2 * HALF].
    _rotate_heads(
        q_ptr,
        qo_ptr,
        stride_qt,
        stride_qh,
        HQ,
        offs_t64,
        offs_d,
        mask,
        cos,
        sin,
        HALF,
        HQ * 2 * HALF,
        2 * HALF,
    )
    _rotate_heads(
        k_ptr,
        ko_ptr,
        stride_kt,
        stride_kh,
        HK,
        offs_t64,
        offs_d,
        mask,
        cos,
        sin,
        HALF,
        HK * 2 * HALF,
        2 * HALF,
    )


def _blocks(half: int) -> tuple[int, int, int]:
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(64, 2048 // block_half))
    return block_t, block_half, 4


def rope_qk(q, k, positions, inv_freq, sign: int):
    """Rotate ``q [T, HQ, D]`` and ``k [T, HK, D]`` (last dim contiguous) by ``sign``·angle."""
    T, HQ, D = q.shape
    HK = k.shape[1]
    half = D // 2
    qo = _alloc((T, HQ, D), q.dtype, q.device)
    ko = _alloc((T, HK, D), k.dtype, k.device)
    block_t, block_half, num_warps = _blocks(half)
    if T:
        _rope_qk_kernel[(cdiv(T, block_t),)](
            q,
            k,
            qo,
            ko,
            positions,
            inv_freq,
            T,
            HQ,
            HK,
            half,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            SIGN=sign,
            BLOCK_T=block_t,
            BLOCK_HALF=block_half,
            num_warps=num_warps,
        )
    return qo, ko
