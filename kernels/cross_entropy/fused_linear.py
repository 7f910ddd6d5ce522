"""Token-balanced (fused linear) cross-entropy without ``[T, V]`` logits, vocab-parallel.

Math
----
For tokens ``t`` with label ``y_t != ignore_index`` (the *loss tokens*) and logits
``z_t = hidden_t · weightᵀ`` over the full vocabulary (all tensor-parallel shards),

    loss = Σ_t [lse(z_t) − z_t[y_t]] / N,          lse(z) = log Σ_v exp(z_v),

with ``N`` the caller's normalizer (the global loss-token count of the whole step for the
HBP "Ave-Token" loss; ``N = 1`` when ``None``). The gradient w.r.t. the logits is
``dz_t = g/N · (softmax(z_t) − onehot(y_t))`` for loss tokens and 0 otherwise (``g`` is the
incoming scalar gradient); ``dhidden = dz · weight`` and ``dweight = dzᵀ · hidden``.

Forward: the vocabulary of this rank is cut into splits; per (token block, split) a kernel
keeps the online-softmax state (running max ``m``, ``s = Σ exp(z − m)``) and picks the
target logit when the label falls in the split. Splits, then ranks, are merged with
``m* = max m_i``, ``s* = Σ s_i·exp(m_i − m*)``, target = Σ (one rank owns each label):
three ``all_reduce`` calls on ``[T]`` fp32 vectors. Only ``lse = m* + log s*`` (``[T]``
fp32) is saved for the backward.

Backward (``grad_mode="recompute"``): for each (token chunk, vocab chunk) the logits are
recomputed, turned into
``dz`` (``[Tc, Vc]`` in the input dtype on the Triton path, fp32 on the PyTorch path) and
consumed at once by two matmuls: ``dhidden[Tc] += dz · W[Vc]`` (fp32 accumulator ``[T, H]``)
and ``dweight[Vc] = dzᵀ · hidden`` (fp32 accumulation; written once in the weight dtype).
Extra memory is ``O(Tc·Vc + T·H)``, never ``O(T·V)``. With tensor parallelism ``dhidden``
is all-reduced (the hidden states are replicated over the group) unless the caller does it.

``grad_mode="in_forward"`` saves one GEMM: per token chunk the full-vocabulary logits
``[Tc, V]`` are built once, reduced to ``lse``, turned into ``dz`` and consumed
immediately (3 GEMM-sized passes instead of 4); the gradients are kept until the backward
scales them by ``g`` (see ``_LinearCrossEntropyInForward``).

Default ``grad_mode="auto"`` (see ``_resolve_grad_mode``): "in_forward" on CUDA when a
gradient is needed (grad mode on and ``hidden`` or ``weight`` requires grad), "recompute"
otherwise (CPU tensors, including the Triton interpreter; forward-only calls). Why: on an
H100 (2026-11-26, 8192x4096x128256 bf16, fwd+bwd) "recompute" took 1.31-1.83x torch
eager's time, "in_forward" 0.79-0.92x (1.15-1.26x the 3-GEMM floor) at ~10 % of eager's
extra memory. Its extra memory is ``dweight`` (``V_local x H``, the output itself) +
``dhidden`` (``T x H``) + one ``[Tc, V_local]`` logits chunk, held from the end of the
forward to the backward; on CUDA ``Tc`` = 512 tokens (``_in_forward_chunk_tokens``), the
smallest multiple of 128 at which ``dweight += dzᵀ·hidden`` (K = Tc, reading and writing
all of ``dweight`` per chunk) stays compute-bound. "in_forward" supports one backward per
forward (it raises on a second one): the trainer's case (Megatron runs one backward per
micro-batch; its activation recompute re-runs transformer layers, never the output
processor). Use ``grad_mode="recompute"`` to backpropagate through the loss more than once
(``retain_graph=True``) or to accumulate ``dweight`` in fp32. Neither mode is twice
differentiable (``create_graph=True`` gives first-order gradients; differentiating them
raises).

Layout: Triton kernels (fused linear forward/backward tiles with ``tl.dot``; logits
forward/backward tiles), the chunked PyTorch implementation (the CPU fallback), plain fp32
references for tests, the ``torch.autograd.Function``s and the public functions.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..utils import cdiv, is_interpreting, num_sms, resolve_backend

__all__ = [
    "count_loss_tokens",
    "token_balanced_cross_entropy",
    "token_balanced_cross_entropy_from_logits",
    "token_balanced_cross_entropy_reference",
    "token_balanced_cross_entropy_from_logits_reference",
]

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# Tests set this to True: every buffer a kernel must fully write starts as NaN.
_POISON_OUTPUTS = False


def _alloc(shape, dtype, device) -> torch.Tensor:
    if _POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


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


def _chunk_sizes(
    T: int, V: int, device, chunk_tokens: int | None, chunk_vocab: int | None
) -> tuple[int, int]:
    """(Tc, Vc) of the backward (and the PyTorch path): Tc·Vc ≤ a fixed element budget."""
    # 2^25 logits = 64 MB of bf16 dz on CUDA: large enough for efficient GEMMs, small
    # against the 1 GB of the weight gradient itself at V = 128K, H = 4K.
    budget = (1 << 25) if device.type == "cuda" else (1 << 22)
    if chunk_vocab is None:
        chunk_vocab = V if budget >= T * V else max(512, (budget // max(T, 1)) // 128 * 128)
    if chunk_tokens is None:
        chunk_tokens = max(1, budget // chunk_vocab)
    return max(1, min(chunk_tokens, T)), max(1, min(chunk_vocab, V))


_MM_OUT_DTYPE_OK: bool | None = None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result, without fp32 copies of bf16 inputs on CUDA."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        if _MM_OUT_DTYPE_OK is not False:
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE_OK = True
                return out
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE_OK = False
        # Older torch: cuBLAS still accumulates in fp32, only the chunk result is rounded.
        return (a @ b).float()
    return a.float() @ b.float()


# ----------------------------------------------------------------------------- stats (forward)


def _merge_splits(m: torch.Tensor, s: torch.Tensor, tgt: torch.Tensor):
    """[S, T] partial states -> [T] (max, sum-exp relative to it, target)."""
    m_all = m.amax(dim=0)
    shift = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    return m_all, (s * torch.exp(m - shift)).sum(dim=0), tgt.sum(dim=0)


def _torch_online_update(state, z: torch.Tensor, local_label: torch.Tensor, v0: int):
    """PyTorch twin of ``_online_update`` for an fp32 [Tc, Vc] chunk starting at column v0."""
    m, s, tgt = state
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    s = s * torch.exp(m - shift) + torch.exp(z - shift[:, None]).sum(dim=1)
    col = local_label - v0
    hit = (col >= 0) & (col < z.shape[1])
    tgt = tgt + torch.where(
        hit, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None])[:, 0], torch.zeros_like(tgt)
    )
    return m_new, s, tgt


def _stats_torch(source, labels: torch.Tensor, vocab_start: int, Tc: int, Vc: int, linear: bool):
    """Local (m, s, tgt) [T] fp32 from chunks of logits (``source`` = logits or (hidden, weight))."""
    if linear:
        hidden, weight = source
        T, V = hidden.shape[0], weight.shape[0]
    else:
        T, V = source.shape
    device = labels.device
    m = torch.full((T,), float("-inf"), dtype=torch.float32, device=device)
    s = torch.zeros(T, dtype=torch.float32, device=device)
    tgt = torch.zeros(T, dtype=torch.float32, device=device)
    local_label = labels.to(torch.int64) - vocab_start
    for t0 in range(0, T, Tc):
        t1 = min(t0 + Tc, T)
        state = (m[t0:t1], s[t0:t1], tgt[t0:t1])
        for v0 in range(0, V, Vc):
            v1 = min(v0 + Vc, V)
            if linear:
                z = hidden[t0:t1].float() @ weight[v0:v1].float().T
            else:
                z = source[t0:t1, v0:v1].float()
            state = _torch_online_update(state, z, local_label[t0:t1], v0)
        m[t0:t1], s[t0:t1], tgt[t0:t1] = state
    return m, s, tgt


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


def _global_lse_and_target(m, s, tgt, group):
    """Reduce the per-rank states over the tensor-parallel group -> (lse [T], target [T])."""
    if group is not None and torch.distributed.get_world_size(group) > 1:
        dist = torch.distributed
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
        s = s * torch.exp(m - shift)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        tgt = tgt.clone()
        dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)
        m = m_all
    return m + torch.log(s), tgt


def _finish_loss(lse, tgt, labels, ignore_index, normalizer):
    is_loss_token = labels != ignore_index
    loss = torch.where(is_loss_token, lse - tgt, torch.zeros_like(lse)).sum()
    if normalizer is not None:
        loss = loss / normalizer
    return loss


def _grad_scale(grad_out: torch.Tensor, normalizer) -> torch.Tensor:
    """0-dim fp32 g/N on the device (no host sync)."""
    g = grad_out.detach().to(torch.float32).reshape(())
    if normalizer is not None:
        g = g / normalizer
    return g.contiguous()


def _normalizer_for(normalizer, device):
    if normalizer is None or not isinstance(normalizer, torch.Tensor):
        return None if normalizer is None else float(normalizer)
    return normalizer.detach().to(device=device, dtype=torch.float32).reshape(())


# ----------------------------------------------------------------------------- autograd


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, ignore_index, group, backend, chunks, all_reduce_dh):
        T, V = hidden.shape[0], weight.shape[0]
        vocab_start = _vocab_start(group, V)
        Tc, Vc = _chunk_sizes(T, V, hidden.device, *chunks)
        if backend == "triton":
            m, s, tgt = _stats_triton_linear(hidden, weight, labels, vocab_start, chunks[1])
        else:
            m, s, tgt = _stats_torch((hidden, weight), labels, vocab_start, Tc, Vc, linear=True)
        lse, tgt = _global_lse_and_target(m, s, tgt, group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.normalizer, ctx.ignore_index, ctx.group = normalizer, ignore_index, group
        ctx.backend, ctx.chunks, ctx.all_reduce_dh, ctx.vocab_start = (
            backend,
            (Tc, Vc),
            all_reduce_dh,
            vocab_start,
        )
        return _finish_loss(lse, tgt, labels, ignore_index, normalizer)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T, H = hidden.shape
        V = weight.shape[0]
        Tc, Vc = ctx.chunks
        g = _grad_scale(grad_out, ctx.normalizer)
        dh_acc = torch.zeros((T, H), dtype=torch.float32, device=hidden.device) if need_dh else None
        dw = torch.empty_like(weight) if need_dw else None
        one_token_chunk = Tc >= T
        is_loss_token = labels != ctx.ignore_index
        for v0 in range(0, V, Vc):
            v1 = min(v0 + Vc, V)
            w_chunk = weight[v0:v1]
            dw_acc = None
            for t0 in range(0, T, Tc):
                t1 = min(t0 + Tc, T)
                if ctx.backend == "triton":
                    dz = _dlogits_triton_linear(hidden[t0:t1], w_chunk, labels[t0:t1], lse[t0:t1], g, ctx, v0)
                else:
                    z = hidden[t0:t1].float() @ w_chunk.float().T
                    dz = _dlogits_torch(
                        z, labels[t0:t1], is_loss_token[t0:t1], lse[t0:t1], g, ctx.vocab_start + v0
                    )
                if need_dh:
                    # Row blocks bound the fp32 temporary of the product to ~16 MB.
                    step = max(1, (1 << 22) // H)
                    for r0 in range(0, t1 - t0, step):
                        r1 = min(r0 + step, t1 - t0)
                        dh_acc[t0 + r0 : t0 + r1] += _mm_fp32(dz[r0:r1], w_chunk)
                if need_dw:
                    if one_token_chunk and dz.dtype == weight.dtype:
                        torch.mm(dz.T, hidden[t0:t1], out=dw[v0:v1])
                    elif one_token_chunk:
                        dw[v0:v1] = _mm_fp32(dz.T, hidden[t0:t1])
                    else:
                        part = _mm_fp32(dz.T, hidden[t0:t1])
                        dw_acc = part if dw_acc is None else dw_acc.add_(part)
            if need_dw and dw_acc is not None:
                dw[v0:v1] = dw_acc
        dh = None
        if need_dh:
            group = ctx.group
            if ctx.all_reduce_dh and group is not None and torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(dh_acc, op=torch.distributed.ReduceOp.SUM, group=group)
            dh = dh_acc.to(hidden.dtype)
        return dh, dw, None, None, None, None, None, None, None


def _dlogits_torch(z, labels, is_loss_token, lse, g, label_shift):
    """fp32 (softmax − onehot)·g for one chunk, zero rows for ignored tokens."""
    dz = torch.exp(z - lse[:, None])
    col = labels.to(torch.int64) - label_shift
    hit = is_loss_token & (col >= 0) & (col < z.shape[1])
    # scatter_add instead of boolean indexing: no data-dependent shapes, no host sync.
    dz.scatter_add_(1, col.clamp(0, z.shape[1] - 1)[:, None], -hit.to(dz.dtype)[:, None])
    dz = dz * g
    return torch.where(is_loss_token[:, None], dz, torch.zeros_like(dz))


def _dlogits_triton_linear(hidden, w_chunk, labels, lse, g, ctx, v0):
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
        ctx.vocab_start + v0,
        ctx.ignore_index,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        BLOCK_H=cfg["BLOCK_H"],
        UPCAST=is_interpreting() and hidden.dtype != torch.float32,
        IEEE=hidden.dtype == torch.float32,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return dz


def _logits_to_dlogits_triton(z, labels, lse, g, vocab_start: int, ignore_index: int) -> torch.Tensor:
    """Overwrite a [Tc, V] logits buffer of ours with dz (each element is read, then written,
    by the same program, so in place is safe)."""
    T, V = z.shape
    cfg = _logits_blocks()
    _ce_logits_bwd_kernel[(cdiv(T, cfg["BLOCK_T"]), cdiv(V, cfg["BLOCK_V"]))](
        z,
        labels,
        lse,
        g,
        z,
        T,
        V,
        z.stride(0),
        z.stride(0),
        vocab_start,
        ignore_index,
        BLOCK_T=cfg["BLOCK_T"],
        BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"],
    )
    return z


# grad_mode="in_forward" on CUDA: token rows per full-vocabulary logits chunk, and a cap on
# the chunk's elements for very large vocabulary shards.
_IN_FORWARD_CUDA_TOKENS = 512
_IN_FORWARD_CUDA_MAX_ELEMENTS = 1 << 27
_IN_FORWARD_CPU_ELEMENTS = 1 << 22


def _in_forward_chunk_tokens(T: int, V: int, device, chunk_tokens: int | None) -> int:
    """Token rows ``Tc`` per full-vocabulary logits chunk of grad_mode="in_forward".

    CUDA: 512 tokens (fewer only when ``512·V`` exceeds 2²⁷ elements), a multiple of 128
    when ≥ 128. The chunk ``[Tc, V]`` costs ``Tc/H`` of ``dweight``'s memory (12.5 % at
    H = 4096: 131 MB bf16 at V = 128256), and each chunk's ``dweight += dzᵀ·hidden[Tc]``
    (K = Tc) reads and writes all of ``dweight``: 2·Tc FLOP per 4 bytes, compute-bound on an
    H100 (~300 FLOP/byte machine balance at ~1 PFLOP/s, 3.35 TB/s) only from Tc ≈ 512; a
    smaller chunk (e.g. 256) saves ~65 MB but makes that GEMM memory-bound (~+10 ms at
    8192x4096x128256). CPU: 2²² elements (fp32 PyTorch path).
    """
    if chunk_tokens is None:
        if device.type == "cuda":
            chunk_tokens = max(1, min(_IN_FORWARD_CUDA_TOKENS, _IN_FORWARD_CUDA_MAX_ELEMENTS // max(V, 1)))
        else:
            chunk_tokens = max(1, _IN_FORWARD_CPU_ELEMENTS // max(V, 1))
        if chunk_tokens < T and chunk_tokens >= 128:
            chunk_tokens = chunk_tokens // 128 * 128
    return max(1, min(chunk_tokens, T))


def _resolve_grad_mode(grad_mode: str, device, need_grad: bool) -> str:
    """The grad_mode that runs. ``"auto"``: "in_forward" for CUDA tensors when a gradient is
    needed (``need_grad``: grad mode on and hidden or weight requires grad), else
    "recompute" (CPU tensors, the Triton interpreter included: fp32 accumulation and
    vocabulary chunks that suit the PyTorch path; forward-only calls: the fused forward
    kernel keeps only ``lse``, no logits chunk). Explicit modes are returned unchanged."""
    if grad_mode == "auto":
        return "in_forward" if device.type == "cuda" and need_grad else "recompute"
    return grad_mode


class _LinearCrossEntropyInForward(torch.autograd.Function):
    """grad_mode="in_forward": 3 GEMM-sized passes instead of 4 (Liger-style).

    Per token chunk the full-vocabulary logits ``[Tc, V_local]`` are built once (cuBLAS on
    CUDA), reduced to ``lse`` (Triton), turned into ``dz`` in place with ``g = 1/N``, and
    consumed by ``dhidden[Tc] = dz · W`` and ``dweight += dzᵀ · hidden[Tc]``. The gradients
    are kept until backward and scaled there by the incoming gradient, in place (so one
    backward per forward). On the Triton path ``dweight`` is accumulated across token chunks
    in the weight dtype (one bf16 rounding per token chunk); the PyTorch path accumulates in
    fp32.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        normalizer,
        ignore_index,
        group,
        backend,
        chunk_tokens,
        need,
        all_reduce_dh,
    ):
        T, H = hidden.shape
        V = weight.shape[0]
        device = hidden.device
        vocab_start = _vocab_start(group, V)
        need_dh, need_dw = need
        Tc = _in_forward_chunk_tokens(T, V, device, chunk_tokens)
        triton_path = backend == "triton"
        lse = torch.empty(T, dtype=torch.float32, device=device)
        tgt = torch.empty(T, dtype=torch.float32, device=device)
        g = _grad_scale(torch.ones((), dtype=torch.float32, device=device), normalizer)
        is_loss_token = labels != ignore_index
        acc_dtype = weight.dtype if triton_path else torch.float32
        dh = _alloc((T, H), hidden.dtype if triton_path else torch.float32, device) if need_dh else None
        dw = torch.zeros((V, H), dtype=acc_dtype, device=device) if need_dw else None
        for t0 in range(0, T, Tc):
            t1 = min(t0 + Tc, T)
            h_c, y_c = hidden[t0:t1], labels[t0:t1]
            if triton_path:
                z = h_c @ weight.T
                m_c, s_c, tgt_c = _stats_triton_logits(z, y_c, vocab_start, None)
            else:
                z = h_c.float() @ weight.float().T
                m_c, s_c, tgt_c = _stats_torch(z, y_c, vocab_start, t1 - t0, V, linear=False)
            lse_c, tgt_c = _global_lse_and_target(m_c, s_c, tgt_c, group)
            lse[t0:t1], tgt[t0:t1] = lse_c, tgt_c
            if not (need_dh or need_dw):
                continue
            if triton_path:
                dz = _logits_to_dlogits_triton(z, y_c, lse_c, g, vocab_start, ignore_index)
                if need_dh:
                    torch.mm(dz, weight, out=dh[t0:t1])
                if need_dw:
                    dw.addmm_(dz.T, h_c)
            else:
                dz = _dlogits_torch(z, y_c, is_loss_token[t0:t1], lse_c, g, vocab_start)
                if need_dh:
                    dh[t0:t1] = dz @ weight.float()
                if need_dw:
                    dw.addmm_(dz.T, h_c.float())
            del z, dz
        if need_dh and all_reduce_dh and group is not None and torch.distributed.get_world_size(group) > 1:
            # Sum the shards' shares in fp32, in row blocks: a 16 MB temporary, not 4·T·H bytes.
            step = max(1, (1 << 22) // max(H, 1))
            for r0 in range(0, T, step):
                block32 = dh[r0 : r0 + step].float()
                torch.distributed.all_reduce(block32, op=torch.distributed.ReduceOp.SUM, group=group)
                dh[r0 : r0 + step].copy_(block32)
        ctx.save_for_backward(dh, dw)
        ctx.dtype, ctx.consumed = hidden.dtype, False
        return _finish_loss(lse, tgt, labels, ignore_index, normalizer)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError(
                "token_balanced_cross_entropy(grad_mode='in_forward') supports one backward per forward; "
                "use grad_mode='recompute' to backpropagate through the loss more than once"
            )
        ctx.consumed = True
        dh, dw = ctx.saved_tensors
        scale = grad_out.detach().to(torch.float32).reshape(())
        outs = []
        for grad in (dh, dw):
            if grad is None:
                outs.append(None)
                continue
            # In place, in row blocks: no second full-size gradient buffer, fp32 multiply.
            step = max(1, (1 << 22) // max(grad.shape[1], 1))
            for r0 in range(0, grad.shape[0], step):
                block = grad[r0 : r0 + step]
                block.copy_(block.float() * scale)
            outs.append(grad.to(ctx.dtype))
        return outs[0], outs[1], None, None, None, None, None, None, None, None


class _LogitsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, normalizer, ignore_index, group, backend, chunks):
        T, V = logits.shape
        vocab_start = _vocab_start(group, V)
        Tc, Vc = _chunk_sizes(T, V, logits.device, *chunks)
        if backend == "triton":
            m, s, tgt = _stats_triton_logits(logits, labels, vocab_start, chunks[1])
        else:
            m, s, tgt = _stats_torch(logits, labels, vocab_start, Tc, Vc, linear=False)
        lse, tgt = _global_lse_and_target(m, s, tgt, group)
        ctx.save_for_backward(logits, labels, lse)
        ctx.normalizer, ctx.ignore_index, ctx.backend = normalizer, ignore_index, backend
        ctx.chunks, ctx.vocab_start = (Tc, Vc), vocab_start
        return _finish_loss(lse, tgt, labels, ignore_index, normalizer)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        g = _grad_scale(grad_out, ctx.normalizer)
        T, V = logits.shape
        dx = _alloc((T, V), logits.dtype, logits.device)
        if ctx.backend == "triton":
            cfg = _logits_blocks()
            _ce_logits_bwd_kernel[(cdiv(T, cfg["BLOCK_T"]), cdiv(V, cfg["BLOCK_V"]))](
                logits,
                labels,
                lse,
                g,
                dx,
                T,
                V,
                logits.stride(0),
                dx.stride(0),
                ctx.vocab_start,
                ctx.ignore_index,
                BLOCK_T=cfg["BLOCK_T"],
                BLOCK_V=cfg["BLOCK_V"],
                num_warps=cfg["num_warps"],
            )
        else:
            Tc, Vc = ctx.chunks
            is_loss_token = labels != ctx.ignore_index
            for t0 in range(0, T, Tc):
                t1 = min(t0 + Tc, T)
                for v0 in range(0, V, Vc):
                    v1 = min(v0 + Vc, V)
                    z = logits[t0:t1, v0:v1].float()
                    dz = _dlogits_torch(
                        z, labels[t0:t1], is_loss_token[t0:t1], lse[t0:t1], g, ctx.vocab_start + v0
                    )
                    dx[t0:t1, v0:v1] = dz
        return dx, None, None, None, None, None, None


# ----------------------------------------------------------------------------- validation


def _vocab_start(group, v_local: int) -> int:
    if group is None:
        return 0
    return torch.distributed.get_rank(group) * v_local


def _tp_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


def _check_normalizer(normalizer, where: str, device) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"{where}: normalizer tensor must have one element, got shape {tuple(normalizer.shape)}"
            )
        if normalizer.device != device:
            raise ValueError(f"{where}: normalizer is on {normalizer.device}, inputs on {device}; move it")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real) or not normalizer > 0:
        raise ValueError(
            f"{where}: normalizer must be a positive number, a one-element tensor or None, got {normalizer!r}"
        )


def _check_labels(
    labels, T: int, where: str, device, v_global: int, ignore_index: int, check_values: bool
) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: labels must be int64 (or int32), got {labels.dtype}; use labels.long()")
    if tuple(labels.shape) != (T,):
        raise ValueError(f"{where}: labels must have shape [T] = [{T}], got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{where}: labels are on {labels.device}, inputs on {device}; move them")
    if check_values and T:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v_global))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"{where}: labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {v_global}) and is not "
                f"ignore_index={ignore_index}"
            )


def _check_float(t, name: str, where: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{where}: {name} dtype must be float32 or bfloat16, got {t.dtype}")


def _check_chunks(chunk_tokens, chunk_vocab, where: str) -> None:
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {name} must be None or an int >= 1, got {value!r}")


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- public


def count_loss_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of loss tokens (``labels != ignore_index``) as a 0-dim int64 tensor on the
    labels' device (no host sync). Sum it over micro-batches and data-parallel replicas to
    get the step's normalizer."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"count_loss_tokens: labels must be a torch.Tensor, got {type(labels).__name__}")
    return (labels != ignore_index).sum(dtype=torch.int64)


def token_balanced_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    tp_group=None,
    *,
    return_num_tokens: bool = False,
    all_reduce_hidden_grad: bool = True,
    grad_mode: str = "auto",
    backend: str = "auto",
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    validate: bool | None = None,
):
    """Fused ``hidden @ weight.T`` + cross-entropy, summed over loss tokens, divided by ``normalizer``.

    Never materialises the ``[T, V]`` logits. With a gradient on CUDA (the default
    ``grad_mode="auto"`` resolves to "in_forward") the forward builds full-vocabulary logits
    for ``chunk_tokens`` tokens at a time and computes the gradients right away; otherwise
    ("recompute") the forward keeps an online softmax state per token and vocabulary split
    and the backward recomputes logits chunk by chunk (see the module docstring for the
    math, the rule and the memory bound).

    Args:
        hidden: ``[T, H]`` float32 or bfloat16, the final hidden states (replicated over
            ``tp_group``).
        weight: ``[V_local, H]``, same dtype/device, the output-layer weight. With a
            ``tp_group`` of size ``P > 1`` it is this rank's contiguous vocabulary shard:
            rank ``r`` holds the ids ``[r·V_local, (r+1)·V_local)`` (Megatron's
            ``ColumnParallelLinear`` output layer); all ranks must hold equal shards.
        labels: ``[T]`` int64 global token ids; ``ignore_index`` marks tokens without loss.
        normalizer: ``None`` (plain sum), a positive Python number, or a one-element tensor
            (e.g. the global loss-token count of the step; used on device, no host sync, and
            treated as a constant: no gradient flows into it).
        ignore_index: label value of ignored tokens.
        tp_group: ``torch.distributed`` process group of the vocabulary shards, or ``None``.
        return_num_tokens: also return :func:`count_loss_tokens` of ``labels``.
        all_reduce_hidden_grad: with ``P > 1`` all-reduce the hidden gradient over
            ``tp_group`` (it is the sum of every shard's contribution). Set False only if
            the caller already applies Megatron's ``copy_to_tensor_model_parallel_region``.
        grad_mode: "auto" (default): "in_forward" for CUDA tensors when a gradient is
            needed (grad mode on and ``hidden`` or ``weight`` requires grad), "recompute"
            otherwise (CPU tensors, forward-only calls). "in_forward": the forward also
            computes the gradients from full-vocabulary token chunks (3 GEMM-sized passes;
            ``chunk_tokens`` rows of ``[Tc, V_local]`` logits in the input dtype, 512 by
            default on CUDA) and keeps them until backward; extra memory ``dweight`` +
            ``dhidden`` + one chunk; ``dweight`` is accumulated over token chunks in the
            weight dtype on the Triton path (one rounding per chunk); the logits are
            rounded to the input dtype (as in torch eager); one backward per forward (a
            second raises). "recompute": the backward recomputes the logits; 4 GEMM-sized
            passes, fp32 logits and accumulation everywhere, any number of backwards,
            extra memory ``O(Tc·Vc + T·H)`` before ``dweight``. Neither is twice
            differentiable.
        backend: "auto" (Triton on CUDA, chunked PyTorch on CPU), "triton" (CUDA, or CPU
            under ``TRITON_INTERPRET=1``), "torch".
        chunk_tokens, chunk_vocab: "recompute": chunk sizes of the backward and of the
            PyTorch path (``chunk_vocab`` also sets the vocabulary split width of the Triton
            forward); default: one chunk holds at most 2²⁵ (CUDA) / 2²² (CPU) logits.
            "in_forward": ``chunk_tokens`` rows per full-vocabulary chunk (default 512 on
            CUDA, 2²² / V_local on CPU); ``chunk_vocab`` is not used.
        validate: check label values (needs a host sync); default: only for CPU tensors.

    Returns:
        0-dim float32 loss ``Σ_{t: y_t ≠ ignore_index} (lse(z_t) − z_t[y_t]) / normalizer``
        (0 when every token is ignored), identical on every rank of ``tp_group``; with
        ``return_num_tokens`` a tuple ``(loss, num_loss_tokens)`` (0-dim int64).
        Gradients flow to ``hidden`` and ``weight`` (fp32 accumulation, returned in the
        input dtype); the inputs are never written.
    """
    where = "token_balanced_cross_entropy"
    _check_float(hidden, "hidden", where, 2)
    _check_float(weight, "weight", where, 2)
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"{where}: weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, {hidden.device})"
        )
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{where}: hidden is [T, {hidden.shape[1]}] but weight is {list(weight.shape)}; H must match"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{where}: weight needs at least one vocabulary row")
    T = hidden.shape[0]
    device = hidden.device
    check_values = device.type == "cpu" if validate is None else validate
    _check_labels(labels, T, where, device, weight.shape[0] * _tp_size(tp_group), ignore_index, check_values)
    _check_normalizer(normalizer, where, device)
    _check_chunks(chunk_tokens, chunk_vocab, where)
    if grad_mode not in ("auto", "recompute", "in_forward"):
        raise ValueError(f"{where}: grad_mode must be 'auto', 'recompute' or 'in_forward', got {grad_mode!r}")
    chosen = resolve_backend(backend, device, where)
    norm = _normalizer_for(normalizer, device)
    grad_on = torch.is_grad_enabled()
    grad_mode = _resolve_grad_mode(
        grad_mode, device, grad_on and (hidden.requires_grad or weight.requires_grad)
    )
    if T == 0:
        # Nothing to sum: keep the graph so that backward yields zero gradients.
        loss = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
    elif grad_mode == "in_forward":
        loss = _LinearCrossEntropyInForward.apply(
            _contiguous_rows(hidden),
            _contiguous_rows(weight),
            labels.contiguous(),
            norm,
            ignore_index,
            tp_group,
            chosen,
            chunk_tokens,
            (grad_on and hidden.requires_grad, grad_on and weight.requires_grad),
            all_reduce_hidden_grad,
        )
    else:
        loss = _LinearCrossEntropy.apply(
            _contiguous_rows(hidden),
            _contiguous_rows(weight),
            labels.contiguous(),
            norm,
            ignore_index,
            tp_group,
            chosen,
            (chunk_tokens, chunk_vocab),
            all_reduce_hidden_grad,
        )
    return (loss, count_loss_tokens(labels, ignore_index)) if return_num_tokens else loss


def token_balanced_cross_entropy_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    tp_group=None,
    *,
    return_num_tokens: bool = False,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    validate: bool | None = None,
):
    """Cross-entropy on given logits, summed over loss tokens and divided by ``normalizer``.

    Same semantics as :func:`token_balanced_cross_entropy` with ``logits`` ``[T, V_local]``
    (float32 or bfloat16; with ``tp_group`` of size > 1 the contiguous vocabulary shard of
    this rank) in place of ``hidden @ weight.T``. The forward reads the logits once and
    keeps only ``lse`` ``[T]``; the backward kernel writes ``d logits`` (a new ``[T, V_local]``
    tensor in the logits dtype, fp32 math) in one pass. The logits are never written.

    Returns:
        0-dim float32 loss (and the 0-dim int64 loss-token count with ``return_num_tokens``).
    """
    where = "token_balanced_cross_entropy_from_logits"
    _check_float(logits, "logits", where, 2)
    if logits.shape[1] < 1:
        raise ValueError(f"{where}: logits need at least one vocabulary column")
    T = logits.shape[0]
    device = logits.device
    check_values = device.type == "cpu" if validate is None else validate
    _check_labels(labels, T, where, device, logits.shape[1] * _tp_size(tp_group), ignore_index, check_values)
    _check_normalizer(normalizer, where, device)
    _check_chunks(chunk_tokens, chunk_vocab, where)
    chosen = resolve_backend(backend, device, where)
    norm = _normalizer_for(normalizer, device)
    if T == 0:
        loss = (logits.sum() * 0.0).float()
    else:
        loss = _LogitsCrossEntropy.apply(
            _contiguous_rows(logits),
            labels.contiguous(),
            norm,
            ignore_index,
            tp_group,
            chosen,
            (chunk_tokens, chunk_vocab),
        )
    return (loss, count_loss_tokens(labels, ignore_index)) if return_num_tokens else loss


# ----------------------------------------------------------------------------- references


def token_balanced_cross_entropy_from_logits_reference(
    logits: torch.Tensor, labels: torch.Tensor, normalizer=None, ignore_index: int = -100
) -> torch.Tensor:
    """Plain fp32 PyTorch (unchunked, single process, full vocabulary) for tests."""
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="sum")
    if normalizer is not None:
        loss = loss / (normalizer.float() if isinstance(normalizer, torch.Tensor) else float(normalizer))
    return loss


def token_balanced_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer=None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain fp32 PyTorch: materialises ``hidden.float() @ weight.float().T`` (tests only)."""
    return token_balanced_cross_entropy_from_logits_reference(
        hidden.float() @ weight.float().T, labels, normalizer, ignore_index
    )
