"""Triton kernels of the token-balanced cross-entropy and their launchers.

Fused linear forward/backward tiles (``tl.dot`` logits, online softmax state per token block
and vocabulary split; ``dz`` per token and vocabulary chunk) and the logits forward/backward
tiles, their launch configurations, and the launchers the autograd functions call. Every
buffer a kernel must fully write comes from :func:`_alloc` (NaN-filled when the tests set
``kernels.utils.POISON_OUTPUTS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import alloc_output as _alloc
from ..utils import cdiv, is_interpreting, num_sms

# ----------------------------------------------------------------------------- Triton


@triton.jit
def _online_update(m, s, tgt, logits, offs_v, mask_v, local_label):
    """Merge one [BLOCK_T, BLOCK_V] fp32 tile into the running (max, sum-exp, target)."""
    z = tl.where(mask_v[None, :], logits, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    # A row whose logits so far are all -inf keeps m = -inf; shift by 0 to avoid inf - inf.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    hit = (offs_v[None, :] == local_label[:, None]) & mask_v[None, :]
    tgt += tl.sum(tl.where(hit, logits, 0.0), axis=1)
    return m_new, s, tgt


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    offs_t,
    mask_t,
    offs_v,
    mask_v,
    H,
    stride_h,
    stride_w,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """fp32 [BLOCK_T, BLOCK_V] tile of hidden[offs_t] · weight[offs_v]ᵀ (zeros where masked)."""
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_h = k0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        a = tl.load(
            h_ptr + offs_t[:, None] * stride_h + offs_h[None, :],
            mask=mask_t[:, None] & mask_h[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + offs_v[None, :] * stride_w + offs_h[:, None],
            mask=mask_h[:, None] & mask_v[None, :],
            other=0.0,
        )
        if UPCAST:
            # bf16 tl.dot is wrong in the interpreter (ENVIRONMENT.md); products are exact in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _flce_fwd_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    tgt_ptr,
    T,
    V,
    H,
    stride_h,
    stride_w,
    vocab_start,
    cols_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    labels = tl.load(labels_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64)
    local_label = labels - vocab_start
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_lo = pid_s.to(tl.int64) * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < v_hi
        z = _logits_tile(
            h_ptr,
            w_ptr,
            offs_t,
            mask_t,
            offs_v,
            mask_v,
            H,
            stride_h,
            stride_w,
            BLOCK_T,
            BLOCK_V,
            BLOCK_H,
            UPCAST,
            IEEE,
        )
        m, s, tgt = _online_update(m, s, tgt, z, offs_v, mask_v, local_label)
    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(m_ptr + out, m, mask=mask_t)
    tl.store(s_ptr + out, s, mask=mask_t)
    tl.store(tgt_ptr + out, tgt, mask=mask_t)


@triton.jit
def _dlogits(z, offs_v, local_label, lse, is_loss_token, g):
    """(softmax − onehot) · g on loss-token rows, exactly 0 elsewhere (no NaN from lse)."""
    p = tl.exp(z - lse[:, None])
    d = tl.where(offs_v[None, :] == local_label[:, None], p - 1.0, p) * g
    return tl.where(is_loss_token[:, None], d, 0.0)


@triton.jit
def _flce_bwd_kernel(
    h_ptr,
    w_ptr,
    labels_ptr,
    lse_ptr,
    g_ptr,
    dz_ptr,
    T,
    V,
    H,
    stride_h,
    stride_w,
    stride_dz,
    label_shift,
    ignore_index,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dz[T, V] for one (token chunk, vocab chunk); pointers are already at the chunk start."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_t = offs_t < T
    mask_v = offs_v < V
    labels = tl.load(labels_ptr + offs_t, mask=mask_t, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    g = tl.load(g_ptr)
    z = _logits_tile(
        h_ptr,
        w_ptr,
        offs_t,
        mask_t,
        offs_v,
        mask_v,
        H,
        stride_h,
        stride_w,
        BLOCK_T,
        BLOCK_V,
        BLOCK_H,
        UPCAST,
        IEEE,
    )
    d = _dlogits(z, offs_v, labels - label_shift, lse, labels != ignore_index, g)
    tl.store(
        dz_ptr + offs_t[:, None] * stride_dz + offs_v[None, :],
        d.to(dz_ptr.dtype.element_ty),
        mask=mask_t[:, None] & mask_v[None, :],
    )


@triton.jit
def _ce_logits_fwd_kernel(
    x_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    tgt_ptr,
    T,
    V,
    stride_x,
    vocab_start,
    cols_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    mask_t = offs_t < T
    local_label = tl.load(labels_ptr + offs_t, mask=mask_t, other=-1).to(tl.int64) - vocab_start
    m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    tgt = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_lo = pid_s.to(tl.int64) * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < v_hi
        z = tl.load(
            x_ptr + offs_t[:, None] * stride_x + offs_v[None, :],
            mask=mask_t[:, None] & mask_v[None, :],
            other=0.0,
        ).to(tl.float32)
        m, s, tgt = _online_update(m, s, tgt, z, offs_v, mask_v, local_label)
    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(m_ptr + out, m, mask=mask_t)
    tl.store(s_ptr + out, s, mask=mask_t)
    tl.store(tgt_ptr + out, tgt, mask=mask_t)


@triton.jit
def _ce_logits_bwd_kernel(
    x_ptr,
    labels_ptr,
    lse_ptr,
    g_ptr,
    dx_ptr,
    T,
    V,
    stride_x,
    stride_dx,
    vocab_start,
    ignore_index,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_v < V)[None, :]
    labels = tl.load(labels_ptr + offs_t, mask=mask_t, other=ignore_index).to(tl.int64)
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    g = tl.load(g_ptr)
    z = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    d = _dlogits(z, offs_v, labels - vocab_start, lse, labels != ignore_index, g)
    tl.store(dx_ptr + offs_t[:, None] * stride_dx + offs_v[None, :], d.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch config


def _linear_blocks(dtype: torch.dtype) -> dict:
    if is_interpreting():
        return dict(BLOCK_T=32, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_T=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=2)
    return dict(BLOCK_T=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


def _logits_blocks() -> dict:
    if is_interpreting():
        return dict(BLOCK_T=16, BLOCK_V=128, num_warps=4)
    return dict(BLOCK_T=8, BLOCK_V=512, num_warps=8)


def _cols_per_split(V: int, T: int, block_t: int, block_v: int, device, chunk_vocab: int | None) -> int:
    """Vocabulary columns per forward split: enough programs to fill the GPU."""
    if chunk_vocab is not None:
        cols = chunk_vocab
    else:
        t_blocks = cdiv(T, block_t)
        splits = max(1, min(cdiv(4 * num_sms(device), t_blocks), cdiv(V, block_v)))
        cols = cdiv(V, splits)
    return cdiv(cols, block_v) * block_v


def _merge_splits(m: torch.Tensor, s: torch.Tensor, tgt: torch.Tensor):
    """[S, T] partial states -> [T] (max, sum-exp relative to it, target)."""
    m_all = m.amax(dim=0)
    shift = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    return m_all, (s * torch.exp(m - shift)).sum(dim=0), tgt.sum(dim=0)


def _stats_triton_linear(hidden, weight, labels, vocab_start: int, chunk_vocab: int | None):
    T, H = hidden.shape
    V = weight.shape[0]
    cfg = _linear_blocks(hidden.dtype)
    cols = _cols_per_split(V, T, cfg["BLOCK_T"], cfg["BLOCK_V"], hidden.device, chunk_vocab)
    splits = cdiv(V, cols)
    m, s, tgt = (_alloc((splits, T), torch.float32, hidden.device) for _ in range(3))
    _flce_fwd_kernel[(cdiv(T, cfg["BLOCK_T"]), splits)](
        hidden,
        weight,
        labels,
        m,
        s,
        tgt,
        T,
        V,
        H,
        hidden.stride(0),
        weight.stride(0),
        vocab_start,
        cols,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        UPCAST=is_interpreting() and hidden.dtype != torch.float32,
        IEEE=hidden.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return _merge_splits(m, s, tgt)


def _stats_triton_logits(logits, labels, vocab_start: int, chunk_vocab: int | None):
    T, V = logits.shape
    cfg = _logits_blocks()
    cols = _cols_per_split(V, T, cfg["BLOCK_T"], cfg["BLOCK_V"], logits.device, chunk_vocab)
    splits = cdiv(V, cols)
    m, s, tgt = (_alloc((splits, T), torch.float32, logits.device) for _ in range(3))
    _ce_logits_fwd_kernel[(cdiv(T, cfg["BLOCK_T"]), splits)](
        logits,
        labels,
        m,
        s,
        tgt,
        T,
        V,
        logits.stride(0),
        vocab_start,
        cols,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"],
    )
    return _merge_splits(m, s, tgt)


def _dlogits_triton_linear(hidden, w_chunk, labels, lse, g, label_shift: int, ignore_index: int):
    """dz [Tc, Vc] in the input dtype for one (token chunk, vocabulary chunk) of the fused linear
    backward; ``label_shift`` is the global id of the chunk's first vocabulary row."""
    T, H = hidden.shape
    V = w_chunk.shape[0]
    cfg = _linear_blocks(hidden.dtype)
    dz = _alloc((T, V), hidden.dtype, hidden.device)
    _flce_bwd_kernel[(cdiv(T, cfg["BLOCK_T"]), cdiv(V, cfg["BLOCK_V"]))](
        hidden,
        w_chunk,
        labels,
        lse,
        g,
        dz,
        T,
        V,
        H,
        hidden.stride(0),
        w_chunk.stride(0),
        dz.stride(0),
        label_shift,
        ignore_index,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        UPCAST=is_interpreting() and hidden.dtype != torch.float32,
        IEEE=hidden.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return dz


def _logits_to_dlogits_triton(
    z, labels, lse, g, vocab_start: int, ignore_index: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """dz of [T, V] logits ``z`` written to ``out`` (``[T, V]``, the logits' dtype), or by default
    over ``z`` itself: a logits buffer of ours (each element is read, then written, by the same
    program, so in place is safe)."""
    T, V = z.shape
    out = z if out is None else out
    cfg = _logits_blocks()
    _ce_logits_bwd_kernel[(cdiv(T, cfg["BLOCK_T"]), cdiv(V, cfg["BLOCK_V"]))](
        z,
        labels,
        lse,
        g,
        out,
        T,
        V,
        z.stride(0),
        out.stride(0),
        vocab_start,
        ignore_index,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"],
    )
    return out
