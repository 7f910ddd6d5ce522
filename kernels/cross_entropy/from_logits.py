"""Token-balanced cross-entropy on given logits ``[T, V_local]`` (vocab-parallel).

The forward reads the logits once (Triton: one program per token block and vocabulary split
keeps the online-softmax state; PyTorch: the same state over chunks) and saves only
``lse [T]``; the backward writes ``d logits`` in one pass. See the package docstring for the
math.
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
    _normalizer_for,
    _tp_size,
    _vocab_start,
    count_loss_tokens,
)
from .validate import _check_chunks, _check_float, _check_labels, _check_normalizer

__all__ = ["token_balanced_cross_entropy_from_logits"]


class _LogitsCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, normalizer, ignore_index, group, backend, chunks):
        T, V = logits.shape
        vocab_start = _vocab_start(group, V)
        Tc, Vc = _chunk_sizes(T, V, logits.device, *chunks)
        if backend == "triton":
            m, s, tgt = _kernel._stats_triton_logits(logits, labels, vocab_start, chunks[1])
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
        dx = _kernel._alloc((T, V), logits.dtype, logits.device)
        if ctx.backend == "triton":
            _kernel._logits_to_dlogits_triton(
                logits, labels, lse, g, ctx.vocab_start, ctx.ignore_index, out=dx
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
