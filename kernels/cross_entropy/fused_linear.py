"""Token-balanced fused linear + cross-entropy without ``[T, V]`` logits, vocab-parallel.

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

The Triton kernels and their launchers are in ``kernel.py``, the chunked PyTorch path (the
CPU fallback) in ``chunked.py``; this module holds the two autograd functions and
:func:`token_balanced_cross_entropy`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..utils import resolve_backend
from . import kernel as _kernel
from .chunked import _dlogits_torch, _stats_torch
from .common import (
    _chunk_sizes,
    _contiguous_rows,
    _finish_loss,
    _global_lse_and_target,
    _grad_scale,
    _mm_fp32,
    _normalizer_for,
    _tp_size,
    _vocab_start,
    count_loss_tokens,
)
from .validate import _check_chunks, _check_float, _check_labels, _check_normalizer

__all__ = ["token_balanced_cross_entropy"]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, ignore_index, group, backend, chunks, all_reduce_dh):
        T, V = hidden.shape[0], weight.shape[0]
        vocab_start = _vocab_start(group, V)
        Tc, Vc = _chunk_sizes(T, V, hidden.device, *chunks)
        if backend == "triton":
            m, s, tgt = _kernel._stats_triton_linear(hidden, weight, labels, vocab_start, chunks[1])
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
                    dz = _kernel._dlogits_triton_linear(
                        hidden[t0:t1],
                        w_chunk,
                        labels[t0:t1],
                        lse[t0:t1],
                        g,
                        ctx.vocab_start + v0,
                        ctx.ignore_index,
                    )
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
        dh = (
            _kernel._alloc((T, H), hidden.dtype if triton_path else torch.float32, device)
            if need_dh
            else None
        )
        dw = torch.zeros((V, H), dtype=acc_dtype, device=device) if need_dw else None
        for t0 in range(0, T, Tc):
            t1 = min(t0 + Tc, T)
            h_c, y_c = hidden[t0:t1], labels[t0:t1]
            if triton_path:
                z = h_c @ weight.T
                m_c, s_c, tgt_c = _kernel._stats_triton_logits(z, y_c, vocab_start, None)
            else:
                z = h_c.float() @ weight.float().T
                m_c, s_c, tgt_c = _stats_torch(z, y_c, vocab_start, t1 - t0, V, linear=False)
            lse_c, tgt_c = _global_lse_and_target(m_c, s_c, tgt_c, group)
            lse[t0:t1], tgt[t0:t1] = lse_c, tgt_c
            if not (need_dh or need_dw):
                continue
            if triton_path:
                dz = _kernel._logits_to_dlogits_triton(z, y_c, lse_c, g, vocab_start, ignore_index)
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
