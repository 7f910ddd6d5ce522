"""Ulysses context parallelism: all-to-all from token shards to head shards and back.

DeepSpeed-Ulysses (Jacobs et al. 2023, the sequence parallelism the HBP paper uses; Megatron/TE
``cp_comm_type="a2a"``) applied to the zigzag-sharded packed THD micro-batches of
:mod:`megatron_hbp.cp.sharding`. Each of the ``c`` CP ranks holds ``T / c`` tokens of every
head. One all-to-all of the fused ``q|k|v`` buffer gives each rank all ``T`` tokens of ``H / c``
query heads (and the K/V heads they read); one cached permutation puts the tokens back into
document order; the *same* packed causal attention as ``c = 1`` runs over whole documents;
the inverse permutation and a second all-to-all return ``[T / c, H, d]``::

    rank r: q,k,v [T/c, H, d] ──a2a──► [T, H/c, d] ──perm──► attention per document ──perm⁻¹──a2a──► [T/c, H, d]

Per-rank attention work and the tensors saved for backward are exactly ``1 / c`` of ``c = 1``
(whole documents, no chunking, no key-prefix copies, no extra mask); load balance does not
depend on the document mix. Each rank sends ``(c-1)/c`` of its local q, k, v (forward) and of
its output (forward), and the same again for the gradients (backward)
(:func:`ulysses_comm_bytes`).

K/V heads (GQA). Query head ``h`` reads K/V head ``h // (H / H_kv)`` (Megatron's grouping).
Rank ``j`` gets query heads ``[j H/c, (j+1) H/c)`` and exactly the K/V heads they read:
``H_kv / c`` of them when ``c`` divides ``H_kv``; one (replicated to ``c / H_kv`` ranks) when
``H_kv`` divides ``c``; otherwise one K/V copy per query head. Replicated heads' gradients are
summed by the backward of the head selection (``index_add``). ``H`` must be divisible by ``c``
(:func:`check_ulysses_heads`).

Attention math: ``torch.nn.attention.varlen.varlen_attn`` on CUDA fp16/bf16 (one call, GQA
without copies where torch has ``enable_gqa``), else :class:`_DocumentAttention`, an exact
per-document attention in PyTorch with FlashAttention's saved-tensor contract (q, k, v, output,
fp32 log-sum-exp; probabilities are recomputed in backward), so the memory behaviour on CPU is
the GPU's. Padding tokens (the end of each padded document span) take part in the attention
of their own span only; their outputs and gradients are set to zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_hbp.cp.attention import _check_qkv, _pick_backend, _varlen_fn, _varlen_has_gqa
from megatron_hbp.cp.sharding import _as_tuple, _check_real, _unshard_perm_cpu, validate_cp_layout
from megatron_hbp.headlayout import check_ulysses_heads, kv_heads_per_rank
from megatron_hbp.planner.workload import cp_comm_bytes as _workload_cp_comm_bytes

__all__ = [
    "check_ulysses_heads",
    "kv_heads_per_rank",
    "ulysses_attention",
    "ulysses_comm_bytes",
]

_BACKENDS = ("auto", "sdpa", "varlen")


# ---------------------------------------------------------------------------------------------
# Communication volume


def ulysses_comm_bytes(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cp_size: int,
    *,
    num_layers: int = 1,
    recompute_layers: int = 0,
    dtype_bytes: int = 2,
    backward: bool = True,
) -> int:
    """Bytes one rank sends for Ulysses attention on one micro-batch of ``num_tokens`` padded
    tokens (whole pack), per-TP-rank head counts.

    Forward: q|k|v to head shards (``T/c · (H + 2 m c) d`` elements, ``(c-1)/c`` of it leaves the
    rank; ``m`` = K/V heads per rank, :func:`kv_heads_per_rank`) and the output back (``T/c · H d``).
    Backward: the same volumes for dOut and dq|dk|dv. A recomputed layer repeats its forward.
    """
    # the one formula (NumPy, vectorised): megatron_hbp.planner.workload.cp_comm_bytes
    return int(
        _workload_cp_comm_bytes(
            num_tokens, cp_size, cp_impl="ulysses", num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, num_layers=num_layers, recompute_layers=recompute_layers,
            dtype_bytes=dtype_bytes, backward=backward,
        )
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Layout of one micro-batch (cached: every layer reuses it)


@dataclass(frozen=True)
class _Layout:
    src: torch.Tensor
    """int64 [T]: CP rank that holds global token i (rank-major all-to-all block)."""
    row: torch.Tensor
    """int64 [T]: row of global token i inside its rank's local shard."""
    pad: torch.Tensor
    """int64 [P]: global positions of padding tokens."""
    cu: torch.Tensor
    """int32 [n+1] padded document boundaries (on the device)."""
    spans: tuple[tuple[int, int], ...]
    """(start, padded length) per non-empty document."""
    max_len: int


@functools.lru_cache(maxsize=16)
def _layout_cpu(cu_padded: tuple[int, ...], cu_real: tuple[int, ...], cp_size: int) -> _Layout:
    total = cu_padded[-1] if cu_padded else 0
    perm = _unshard_perm_cpu(cu_padded, cp_size) if cp_size > 1 else torch.arange(total)
    local = max(total // cp_size, 1)
    pad = [
        torch.arange(cu_padded[i] + cu_real[i + 1] - cu_real[i], cu_padded[i + 1])
        for i in range(len(cu_padded) - 1)
    ]
    spans = tuple(
        (cu_padded[i], cu_padded[i + 1] - cu_padded[i])
        for i in range(len(cu_padded) - 1)
        if cu_padded[i + 1] > cu_padded[i]
    )
    return _Layout(
        src=perm // local,
        row=perm % local,
        pad=torch.cat(pad) if pad else torch.zeros(0, dtype=torch.long),
        cu=torch.tensor(cu_padded, dtype=torch.int32),
        spans=spans,
        max_len=max((s for _, s in spans), default=0),
    )


@functools.lru_cache(maxsize=4)
def _layout_on(cu_padded, cu_real, cp_size, device: torch.device) -> _Layout:
    lay = _layout_cpu(cu_padded, cu_real, cp_size)
    if device.type == "cpu":
        return lay
    mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return _Layout(mv(lay.src), mv(lay.row), mv(lay.pad), mv(lay.cu), lay.spans, lay.max_len)


# ---------------------------------------------------------------------------------------------
# All-to-all with the permutation folded in (autograd; nothing saved but cached layouts)


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 of a contiguous ``[c, ...]`` tensor."""
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _SeqToHead(torch.autograd.Function):
    """Local ``q [t, H, d]``, ``k``/``v [t, H_kv, d]`` → global-order ``[T, H/c, d]``, ``[T, m, d]`` ×2."""

    @staticmethod
    def forward(ctx, q, k, v, group, cp_size, kv_index, lay: _Layout):
        t, hq, d = q.shape
        hkv = k.shape[1]
        c = cp_size
        hq_r, m = hq // c, kv_index.shape[1]
        ctx.meta = (group, c, t, hq, hkv, d, hq_r, m, kv_index, lay)
        flat = kv_index.reshape(-1)
        same = m * c == hkv  # every K/V head goes to exactly one rank, in order: no selection copy
        ks, vs = (k, v) if same else (k.index_select(1, flat), v.index_select(1, flat))
        # Send buffer [c, t, (hq_r + 2m) d]: block j goes to rank j (its query heads and their K/V).
        send = torch.cat(
            [q.reshape(t, c, hq_r * d), ks.reshape(t, c, m * d), vs.reshape(t, c, m * d)], dim=2
        ).transpose(0, 1)
        recv = _all_to_all(send.contiguous(), group)  # [c (source rank), t, W]
        # gather each part in global (document) order straight into its own contiguous tensor
        rq, rk, rv = recv.split([hq_r * d, m * d, m * d], dim=2)
        return (
            rq[lay.src, lay.row].view(-1, hq_r, d),
            rk[lay.src, lay.row].view(-1, m, d),
            rv[lay.src, lay.row].view(-1, m, d),
        )

    @staticmethod
    def backward(ctx, dqg, dkg, dvg):
        group, c, t, hq, hkv, d, hq_r, m, kv_index, lay = ctx.meta
        T = dqg.shape[0]
        recv = dqg.new_empty((c, t, (hq_r + 2 * m) * d))
        rq, rk, rv = recv.split([hq_r * d, m * d, m * d], dim=2)
        for part, grad in ((rq, dqg), (rk, dkg), (rv, dvg)):  # a permutation: every slot written once
            part[lay.src, lay.row] = grad.reshape(T, -1)
        send = _all_to_all(recv, group).transpose(0, 1)  # [t, c (destination rank), W]
        dq, dk_sel, dv_sel = send.split([hq_r * d, m * d, m * d], dim=2)
        dq = dq.reshape(t, hq, d)
        if m * c == hkv:
            return dq, dk_sel.reshape(t, hkv, d), dv_sel.reshape(t, hkv, d), None, None, None, None
        flat = kv_index.reshape(-1)  # replicated heads: sum the copies' gradients
        dk = dq.new_zeros((t, hkv, d)).index_add_(1, flat, dk_sel.reshape(t, c * m, d))
        dv = dq.new_zeros((t, hkv, d)).index_add_(1, flat, dv_sel.reshape(t, c * m, d))
        return dq, dk, dv, None, None, None, None


class _HeadToSeq(torch.autograd.Function):
    """Global-order ``out [T, H/c, d]`` → local ``[t, H, d]``; padding rows become zero."""

    @staticmethod
    def forward(ctx, og, group, cp_size, lay: _Layout):
        T, hq_r, d = og.shape
        c, t = cp_size, T // cp_size
        ctx.meta = (group, c, t, hq_r, d, lay)
        og = og.reshape(T, hq_r * d)
        send = og.new_empty((c, t, hq_r * d))
        send[lay.src, lay.row] = og
        if lay.pad.numel():
            send[lay.src[lay.pad], lay.row[lay.pad]] = 0
        recv = _all_to_all(send, group)  # [c (head block), t, hq_r d]
        return recv.transpose(0, 1).reshape(t, c * hq_r, d)

    @staticmethod
    def backward(ctx, dout):
        group, c, t, hq_r, d, lay = ctx.meta
        send = dout.reshape(t, c, hq_r * d).transpose(0, 1).contiguous()
        recv = _all_to_all(send, group)  # [c (source rank), t, hq_r d]
        dg = recv[lay.src, lay.row]
        if lay.pad.numel():
            dg[lay.pad] = 0
        return dg.reshape(-1, hq_r, d), None, None, None


# ---------------------------------------------------------------------------------------------
# Packed causal attention over whole documents


_Q_BLOCK = 1024  # query rows per block: keys [0, block end) only, [block, keys] temporaries


def _blocks(start: int, n: int):
    """(query slice, key end) blocks of one document span: causal keys stop at the block's end."""
    for a in range(0, n, _Q_BLOCK):
        b = min(a + _Q_BLOCK, n)
        yield slice(start + a, start + b), a, b


class _DocumentAttention(torch.autograd.Function):
    """Causal attention per document span, FlashAttention's contract in PyTorch: saves q, k, v,
    the output and the fp32 log-sum-exp; recomputes the probabilities in backward.

    q ``[T, hq, d]``, k/v ``[T, m, d]`` with ``hq % m == 0`` (query head ``i`` reads K/V head
    ``i // (hq / m)``). Computes in fp32 (float64 stays float64), in query blocks that read only
    the keys up to the block's end (the causal triangle, not the square)."""

    @staticmethod
    def forward(ctx, q, k, v, spans, scale):
        T, hq, d = q.shape
        m = k.shape[1]
        g = hq // m
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.empty_like(q)
        lse = torch.empty((T, hq), dtype=acc, device=q.device)
        for start, n in spans:
            kd = k[start : start + n].to(acc).permute(1, 0, 2)[:, None]  # [m, 1, n, d]
            vd = v[start : start + n].to(acc).permute(1, 0, 2)[:, None]
            for rows, a, b in _blocks(start, n):
                qb = q[rows].to(acc).reshape(b - a, m, g, d).permute(1, 2, 0, 3)  # [m, g, bq, d]
                s = (qb @ kd[..., :b, :].transpose(-1, -2)) * scale  # [m, g, bq, b]
                s.masked_fill_(_causal_block(a, b, q.device), float("-inf"))
                lse_b = torch.logsumexp(s, -1)  # [m, g, bq]
                o = torch.exp(s - lse_b[..., None]) @ vd[..., :b, :]
                out[rows] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d).to(q.dtype)
                lse[rows] = lse_b.permute(2, 0, 1).reshape(b - a, hq)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        T, hq, d = q.shape
        m = k.shape[1]
        g = hq // m
        acc = lse.dtype
        dq = torch.zeros_like(q)
        dk = torch.zeros((T, m, d), dtype=acc, device=q.device)
        dv = torch.zeros((T, m, d), dtype=acc, device=q.device)
        for start, n in ctx.spans:
            kd = k[start : start + n].to(acc).permute(1, 0, 2)[:, None]
            vd = v[start : start + n].to(acc).permute(1, 0, 2)[:, None]
            dkd = dk[start : start + n].permute(1, 0, 2)  # [m, n, d] views
            dvd = dv[start : start + n].permute(1, 0, 2)
            for rows, a, b in _blocks(start, n):
                bq = b - a
                qb = q[rows].to(acc).reshape(bq, m, g, d).permute(1, 2, 0, 3)
                ob = out[rows].to(acc).reshape(bq, m, g, d).permute(1, 2, 0, 3)
                dob = dout[rows].to(acc).reshape(bq, m, g, d).permute(1, 2, 0, 3)
                s = (qb @ kd[..., :b, :].transpose(-1, -2)) * ctx.scale
                s.masked_fill_(_causal_block(a, b, q.device), float("-inf"))
                p = torch.exp(s - lse[rows].reshape(bq, m, g).permute(1, 2, 0)[..., None])  # [m, g, bq, b]
                dvd[:, :b] += (p.transpose(-1, -2) @ dob).sum(1)
                dp = dob @ vd[..., :b, :].transpose(-1, -2)
                ds = p * (dp - (dob * ob).sum(-1, keepdim=True)) * ctx.scale
                dq[rows] = (ds @ kd[..., :b, :]).permute(2, 0, 1, 3).reshape(bq, hq, d).to(q.dtype)
                dkd[:, :b] += (ds.transpose(-1, -2) @ qb).sum(1)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


@functools.lru_cache(maxsize=64)
def _causal_block(a: int, b: int, device: torch.device) -> torch.Tensor:
    """True where key j > query a + i (masked), for query rows [a, b) and keys [0, b)."""
    return torch.arange(b, device=device)[None, :] > torch.arange(a, b, device=device)[:, None]


def _attend(qg, kg, vg, lay: _Layout, scale: float, backend: str) -> torch.Tensor:
    """The packed causal attention every rank runs on its head shard (whole documents)."""
    if backend == "varlen":
        kwargs = {}
        if qg.shape[1] != kg.shape[1]:
            if _varlen_has_gqa():
                kwargs["enable_gqa"] = True
            else:  # torch without enable_gqa (2.11): expand K/V heads for the kernel
                rep = qg.shape[1] // kg.shape[1]
                kg, vg = kg.repeat_interleave(rep, 1), vg.repeat_interleave(rep, 1)
        return _varlen_fn()(
            qg, kg, vg, lay.cu, lay.cu, lay.max_len, lay.max_len, scale=scale, window_size=(-1, 0), **kwargs
        )
    return _DocumentAttention.apply(qg, kg, vg, lay.spans, scale)


def ulysses_attention(
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
    """Causal attention within each document of a CP-sharded packed micro-batch (Ulysses).

    Same contract as :func:`megatron_hbp.cp.cp_attention`: q ``[t_local, hq, d]``, k/v
    ``[t_local, hkv, d]`` local zigzag shards, GLOBAL ``cu_seqlens_padded`` / ``cu_seqlens``
    (CPU tensors avoid a host sync), the step's CP group; returns ``[t_local, hq, d]`` with zero
    rows on padding queries. ``hq`` must be divisible by the group size.
    ``backend``: ``auto`` (varlen on CUDA fp16/bf16, else the exact per-document attention),
    ``sdpa`` (the per-document attention), ``varlen``.
    """
    _check_qkv(q, k, v)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens, k/v {k.shape[0]}: all are the same local shard")
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    # Validate before communicating: a bad layout must fail on every rank, not hang one.
    cu_padded = validate_cp_layout(cu_seqlens_padded, cp_size)
    cu_real = _as_tuple(cu_seqlens, "cu_seqlens")
    _check_real(cu_real, cu_padded)
    total = cu_padded[-1] if cu_padded else 0
    if q.shape[0] * cp_size != total:
        raise ValueError(
            f"q holds {q.shape[0]} local tokens but cu_seqlens_padded[-1] = {total} with cp_size = {cp_size}: "
            "pass the GLOBAL cu_seqlens_padded and the local shards"
        )
    kv_index = kv_heads_per_rank(q.shape[1], k.shape[1], cp_size)  # raises on bad heads
    backend = _pick_backend(backend, q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lay = _layout_on(cu_padded, cu_real, cp_size, q.device)
    kv_idx = torch.tensor(kv_index, dtype=torch.long, device=q.device)
    if cp_size == 1:
        og = _attend(q, k, v, lay, scale, backend)
        if lay.pad.numel():
            og = og.index_fill(0, lay.pad, 0)
        return og
    qg, kg, vg = _SeqToHead.apply(q, k, v, cp_group, cp_size, kv_idx, lay)
    og = _attend(qg, kg, vg, lay, scale, backend)
    return _HeadToSeq.apply(og, cp_group, cp_size, lay)
