"""Context-parallel causal attention over packed THD micro-batches (all-gather K/V scheme).

Each CP rank holds the local shard (:func:`~megatron_hbp.cp.sharding.shard_for_cp`) of the
queries, keys and values of one packed micro-batch. Forward:

1. all-gather K and V over the CP group (one collective, K and V stacked);
2. put the gathered rows back into global (document) order;
3. for every local query chunk of every document (chunk ``j`` of size ``s``, global positions
   ``[j·s, (j+1)·s)`` inside the document), attend to the document's keys ``[0, j·s + q_len)``
   with a causal mask aligned bottom-right, where ``q_len`` = the chunk's real (non-padding)
   queries. Padding keys (position ≥ the document's real length) are never seen, padding
   queries output zeros.

Backward: only the local q, k, v are kept from the forward (``_AllGatherAttention``); the
backward all-gathers K/V again, recomputes the attention and back-propagates: dQ stays local,
dK/dV are produced for the whole gathered K/V and reduce-scattered back to their owners (the
all-gather's adjoint). With ``cp_size == 1`` nothing is communicated and this is plain packed
causal attention. The Ulysses scheme (``megatron_hbp.cp.ulysses``) is the trainer's default;
this one is the fallback (query heads not divisible by c) and the reference.

Attention math: per document chunk with ``scaled_dot_product_attention`` (CPU, fp32 or any
dtype; explicit causal mask when queries and keys differ in length), or one call of
``torch.nn.attention.varlen.varlen_attn`` for the whole micro-batch on CUDA in fp16/bf16
(flash attention: causal ``window_size=(-1, 0)`` is aligned bottom-right for unequal
query/key lengths, which is the alignment needed here; softmax statistics in fp32).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_hbp.cp.sharding import _as_tuple, _check_real, _unshard_perm_cpu, validate_cp_layout

__all__ = [
    "auto_attention_backend",
    "cp_attention",
    "cp_attention_local",
    "gather_from_cp",
    "varlen_attn_available",
]

_BACKENDS = ("auto", "sdpa", "varlen")


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attn_available() -> bool:
    """True when ``torch.nn.attention.varlen.varlen_attn`` exists and CUDA is available."""
    return _varlen_fn() is not None and torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _varlen_has_gqa() -> bool:
    fn = _varlen_fn()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


# ---------------------------------------------------------------------------------------------
# Collectives (autograd-aware)


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter(out: torch.Tensor, x: torch.Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, op=dist.ReduceOp.SUM, group=group)


class _GatherFromCP(torch.autograd.Function):
    """All-gather along dim 0 (rank-major); backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        _all_gather(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        _reduce_scatter(out, grad, ctx.group)
        return out, None, None


def gather_from_cp(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of ``x [t_local, ...]`` over ``group`` → ``[size·t_local, ...]`` (rank-major).

    The backward pass sums the gradients of every rank's copy and returns each owner its slice.
    """
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return x
    return _GatherFromCP.apply(x, group, size)


# ---------------------------------------------------------------------------------------------
# Segment plan: which local queries attend which global keys


@dataclass(frozen=True)
class _Plan:
    identity: bool
    """cp == 1 and no padding: queries/keys are the packed tokens as they are."""
    q_index: torch.Tensor
    """int64 [nq]: local rows of the real queries, segment after segment."""
    k_index: torch.Tensor
    """int64 [nk]: global positions of each segment's keys, segment after segment."""
    segments: tuple[tuple[int, int, int, int], ...]
    """(offset in q_index, q_len, global key start, k_len) per segment."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    perm: torch.Tensor | None
    """int64 [T]: gathered (rank-major) row of every global position; None when cp == 1."""
    k_rows: torch.Tensor | None
    """int64 [nk]: gathered row of every segment key (``perm[k_index]``); None when cp == 1."""


@functools.lru_cache(maxsize=16)
def _plan_cpu(cu_padded: tuple[int, ...], cu_real: tuple[int, ...], cp_size: int, cp_rank: int) -> _Plan:
    n = len(cu_padded) - 1
    identity = cp_size == 1 and cu_padded == cu_real
    seg_q_start, seg_q_len, seg_k_start, seg_k_len = [], [], [], []
    for i in range(n):  # loop over documents (not tokens)
        start, padded, real = cu_padded[i], cu_padded[i + 1] - cu_padded[i], cu_real[i + 1] - cu_real[i]
        if cp_size == 1:
            chunks = ((0, start, padded),)  # (chunk index, local start, chunk size)
        else:
            s = padded // (2 * cp_size)
            local = start // cp_size
            chunks = ((cp_rank, local, s), (2 * cp_size - 1 - cp_rank, local + s, s))
        for j, local_start, s in chunks:
            q_len = max(0, min(s, real - j * s))
            if q_len == 0:
                continue
            seg_q_start.append(local_start)
            seg_q_len.append(q_len)
            seg_k_start.append(start)
            seg_k_len.append(j * s + q_len)

    def ranges(starts: list[int], lens: list[int]) -> torch.Tensor:
        st = torch.tensor(starts, dtype=torch.long)
        ln = torch.tensor(lens, dtype=torch.long)
        total = int(ln.sum()) if lens else 0
        first = torch.cumsum(ln, 0) - ln
        return torch.repeat_interleave(st, ln) + torch.arange(total) - torch.repeat_interleave(first, ln)

    q_index = ranges(seg_q_start, seg_q_len)
    k_index = ranges(seg_k_start, seg_k_len)
    q_off = [0]
    for q_len in seg_q_len:
        q_off.append(q_off[-1] + q_len)
    k_off = [0]
    for k_len in seg_k_len:
        k_off.append(k_off[-1] + k_len)
    segments = tuple(zip(q_off[:-1], seg_q_len, seg_k_start, seg_k_len))
    perm = None if cp_size == 1 else _unshard_perm_cpu(cu_padded, cp_size)
    return _Plan(
        identity=identity,
        q_index=q_index,
        k_index=k_index,
        segments=segments,
        cu_q=torch.tensor(q_off, dtype=torch.int32),
        cu_k=torch.tensor(k_off, dtype=torch.int32),
        max_q=max(seg_q_len, default=0),
        max_k=max(seg_k_len, default=0),
        perm=perm,
        k_rows=None if perm is None else perm.index_select(0, k_index),
    )


# Every layer of a micro-batch reuses one layout; a few entries suffice (device memory).
@functools.lru_cache(maxsize=4)
def _plan_on(cu_padded, cu_real, cp_size, cp_rank, device: torch.device) -> _Plan:
    p = _plan_cpu(cu_padded, cu_real, cp_size, cp_rank)
    if device.type == "cpu":
        return p
    mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return _Plan(
        identity=p.identity,
        q_index=mv(p.q_index),
        k_index=mv(p.k_index),
        segments=p.segments,
        cu_q=mv(p.cu_q),
        cu_k=mv(p.cu_k),
        max_q=p.max_q,
        max_k=p.max_k,
        perm=mv(p.perm),
        k_rows=mv(p.k_rows),
    )


# ---------------------------------------------------------------------------------------------
# Attention math on (packed queries, global-order keys)


def _sdpa_segments(
    qp: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor, plan: _Plan, scale: float
) -> torch.Tensor:
    """qp [nq, hq, d] (segments back to back); kg/vg [T, hkv, d] in global order → [nq, hq, d]."""
    gqa = qp.shape[1] != kg.shape[1]
    outs = []
    for q_off, q_len, k_start, k_len in plan.segments:
        q = qp[q_off : q_off + q_len].transpose(0, 1)
        k = kg[k_start : k_start + k_len].transpose(0, 1)
        v = vg[k_start : k_start + k_len].transpose(0, 1)
        if k_len == q_len:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # Causal aligned bottom-right: query t sits at key position t + (k_len - q_len).
            qpos = torch.arange(q_len, device=q.device) + (k_len - q_len)
            mask = torch.arange(k_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, 0)


def _varlen_segments(qp, kp, vp, plan: _Plan, scale: float) -> torch.Tensor:
    """qp [nq, hq, d]; kp/vp [nk, hkv, d] (each segment's keys back to back) → [nq, hq, d]."""
    fn = _varlen_fn()
    kwargs = {}
    if qp.shape[1] != kp.shape[1]:
        if _varlen_has_gqa():
            kwargs["enable_gqa"] = True
        else:
            rep = qp.shape[1] // kp.shape[1]
            kp, vp = kp.repeat_interleave(rep, 1), vp.repeat_interleave(rep, 1)
    return fn(
        qp, kp, vp, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, scale=scale, window_size=(-1, 0), **kwargs
    )


@functools.lru_cache(maxsize=8)
def _varlen_bottom_right_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """One-time check that ``varlen_attn``'s causal mask is aligned bottom-right for
    ``q_len < k_len`` (flash-attention >= 2.1 semantics, which the CP chunks rely on).

    If a torch build ever differs, ``backend="auto"`` falls back to SDPA with an explicit
    mask (slower, never wrong) and says so once.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(3, 2, 16, generator=g)
    k = torch.randn(8, 2, 16, generator=g)
    v = torch.randn(8, 2, 16, generator=g)
    mask = torch.arange(8)[None, :] <= (torch.arange(3) + 5)[:, None]
    want = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    )
    cu_q = torch.tensor([0, 3], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 8], dtype=torch.int32, device=device)
    try:
        got = _varlen_fn()(
            q.to(device, dtype),
            k.to(device, dtype),
            v.to(device, dtype),
            cu_q,
            cu_k,
            3,
            8,
            window_size=(-1, 0),
        )
    except Exception as e:  # pragma: no cover - depends on the CUDA build
        warnings.warn(
            f"varlen_attn failed its self-check ({e}); megatron_hbp.cp uses SDPA instead", stacklevel=2
        )
        return False
    err = float((got.float().cpu() - want.transpose(0, 1)).abs().max())
    if err > 0.05:  # pragma: no cover - depends on the CUDA build
        warnings.warn(
            f"varlen_attn causal mask is not bottom-right aligned (error {err:.3g}); megatron_hbp.cp uses SDPA",
            stacklevel=2,
        )
        return False
    return True


def auto_attention_backend(
    *, on_cuda: bool, half: bool, varlen_available: bool, te_available: bool = False
) -> str:
    """The one ``auto`` attention rule, for the trainer's attention without CP
    (``megatron_hbp.mcore.attention.resolve_backend``) and for this package's CP attention: Transformer
    Engine, then varlen flash attention, only on CUDA with fp16/bf16 activations (both are flash
    kernels without fp32 support), else SDPA (exact, any device and dtype). The CP attention passes
    ``te_available=False``: Transformer Engine's own CP attention is not used."""
    if on_cuda and half and te_available:
        return "te"
    if on_cuda and half and varlen_available:
        return "varlen"
    return "sdpa"


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        half = q.dtype in (torch.float16, torch.bfloat16)
        varlen = (
            q.is_cuda and half and _varlen_fn() is not None and _varlen_bottom_right_ok(q.device, q.dtype)
        )
        return auto_attention_backend(on_cuda=q.is_cuda, half=half, varlen_available=varlen)
    if backend == "varlen":
        if _varlen_fn() is None:
            raise RuntimeError("backend='varlen' needs torch.nn.attention.varlen (torch >= 2.11); use 'sdpa'")
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"backend='varlen' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}; use 'sdpa'"
            )
    return backend


def _check_qkv(q, k, v) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [t, heads, dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def cp_attention_local(
    q: torch.Tensor,
    k_gathered: torch.Tensor,
    v_gathered: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The math of :func:`cp_attention` once K/V are gathered (no communication).

    Args:
        q: ``[T_padded / cp_size, hq, d]`` local query shard of CP rank ``cp_rank``.
        k_gathered, v_gathered: ``[T_padded, hkv, d]``: the local K/V shards of CP ranks
            ``0 .. cp_size-1`` concatenated in rank order (what an all-gather returns); for
            ``cp_size == 1`` simply the packed K/V.
        Others as in :func:`cp_attention`.
    Returns:
        ``[T_padded / cp_size, hq, d]``; zeros on padding queries. Differentiable; the
        gradient w.r.t. ``k_gathered`` covers every rank's keys (sum it over ranks and keep
        each rank's slice to get what the collective version returns).
    """
    _check_qkv(q, k_gathered, v_gathered)
    cu_padded = validate_cp_layout(cu_seqlens_padded, cp_size, cp_rank)
    cu_real = _as_tuple(cu_seqlens, "cu_seqlens")
    _check_real(cu_real, cu_padded)
    t_total = cu_padded[-1] if cu_padded else 0
    if q.shape[0] * cp_size != t_total or k_gathered.shape[0] != t_total:
        raise ValueError(
            f"q holds {q.shape[0]} local tokens and K/V {k_gathered.shape[0]} gathered tokens, but "
            f"cu_seqlens_padded[-1] = {t_total} with cp_size = {cp_size}: pass the GLOBAL "
            f"cu_seqlens_padded, the local query shard and the gathered keys/values"
        )
    backend = _pick_backend(backend, q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    plan = _plan_on(cu_padded, cu_real, cp_size, cp_rank, q.device)

    if plan.q_index.numel() == 0:
        # No real query here; keep K/V (and so a gather's backward) in the graph so the
        # collective in the backward pass runs on every rank of the group.
        return q * 0 + ((k_gathered.sum() + v_gathered.sum()) * 0).to(q.dtype)

    if plan.identity and backend == "varlen":
        return _varlen_segments(q, k_gathered, v_gathered, plan, scale)
    qp = q if plan.identity else q.index_select(0, plan.q_index)
    if backend == "sdpa":
        if plan.perm is None:
            kg, vg = k_gathered, v_gathered
        else:
            kg, vg = k_gathered.index_select(0, plan.perm), v_gathered.index_select(0, plan.perm)
        op = _sdpa_segments(qp, kg, vg, plan, scale)
    else:
        rows = plan.k_index if plan.k_rows is None else plan.k_rows
        op = _varlen_segments(
            qp, k_gathered.index_select(0, rows), v_gathered.index_select(0, rows), plan, scale
        )
    if plan.identity:
        return op
    return q.new_zeros(q.shape).index_copy(0, plan.q_index, op.to(q.dtype))


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_group: dist.ProcessGroup | None,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within each document of a CP-sharded packed micro-batch.

    Args:
        q: ``[t_local, hq, d]`` local query shard (``t_local = T_padded / cp_size``).
        k, v: ``[t_local, hkv, d]``; ``hq`` a multiple of ``hkv`` (GQA: query head ``h`` uses
            key/value head ``h // (hq / hkv)``, Megatron's grouping).
        cu_seqlens_padded: int32 ``[n+1]`` GLOBAL padded document boundaries (spans multiples
            of ``2·cp_size`` when ``cp_size > 1``). CPU tensors avoid a host sync.
        cu_seqlens: int32 ``[n+1]`` GLOBAL real lengths' boundaries (same ``n``).
        cp_group: the CP group of this micro-batch (``None`` or a 1-rank group: no communication).
        softmax_scale: defaults to ``1 / sqrt(d)``.
        backend: ``"auto"`` (varlen flash attention for CUDA fp16/bf16, else SDPA), ``"sdpa"``, ``"varlen"``.
    Returns:
        ``[t_local, hq, d]``, dtype of ``q``; rows of padding queries are zero. Differentiable in
        q, k and v; the backward pass of K/V is a reduce-scatter over ``cp_group`` (every rank of
        the group must call backward, as for any collective).
    """
    _check_qkv(q, k, v)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens, k/v {k.shape[0]}: all are the same local shard")
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)
    # Validate before communicating: a bad layout must fail on every rank, not hang one.
    validate_cp_layout(cu_seqlens_padded, cp_size, cp_rank)
    if cp_size == 1:
        return cp_attention_local(
            q, k, v, cu_seqlens_padded, cu_seqlens, 1, 0, softmax_scale, backend=backend
        )
    args = (cu_seqlens_padded, cu_seqlens, cp_group, cp_size, cp_rank, softmax_scale, backend)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AllGatherAttention.apply(q, k, v, *args)
    return _gathered_attention(q, k, v, *args)


def _gathered_attention(q, k, v, cu_padded, cu_real, group, cp_size, cp_rank, scale, backend):
    gathered = gather_from_cp(torch.stack([k, v], 1), group)  # [T, 2, hkv, d], rank-major
    return cp_attention_local(
        q, gathered[:, 0], gathered[:, 1], cu_padded, cu_real, cp_size, cp_rank, scale, backend=backend
    )


class _AllGatherAttention(torch.autograd.Function):
    """The all-gather CP attention, keeping only the local q, k, v for backward.

    Forward runs without autograd (the gathered K/V and the kernel's saved tensors are freed with
    the layer's forward); backward all-gathers K/V again, recomputes the attention with autograd
    and back-propagates (dK/dV reduce-scattered to their owners). Cost: one more all-gather and
    one more attention forward per layer; memory: no whole-pack tensor survives the forward."""

    @staticmethod
    def forward(ctx, q, k, v, *args):
        ctx.args = args
        ctx.save_for_backward(q, k, v)
        with torch.no_grad():
            return _gathered_attention(q, k, v, *args)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = _gathered_attention(q, k, v, *ctx.args)
        torch.autograd.backward(out, dout)
        return (q.grad, k.grad, v.grad) + (None,) * len(ctx.args)
