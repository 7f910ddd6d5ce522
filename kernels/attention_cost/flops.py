"""Attention FLOPs from causal (query, key) pair counts."""

from __future__ import annotations

import torch

__all__ = ["attention_pairs_to_flops"]


def attention_pairs_to_flops(
    pairs,
    *,
    num_heads: int,
    head_dim: int,
    num_layers: int = 1,
    include_backward: bool = True,
    backward_factor: float = 2.0,
):
    """Convert causal (query, key) pairs from :func:`attention_cost` into attention FLOPs.

    Per pair, head and layer the forward pass does two multiply-adds of length ``head_dim``
    (``q·k`` for the score and ``p·v`` for the output): ``4 · head_dim`` FLOPs. The backward
    pass (dQ, dK, dV, dP) costs ``backward_factor`` times the forward (2.0 by matmul count;
    2.5 if the kernel recomputes the scores, as FlashAttention does). Softmax, masking and
    projections are not included. For grouped-query attention use the number of *query*
    heads: the score work is per query head.

    Args:
        pairs: a Python int or an integer tensor of any shape (e.g. ``[num_packs, cp]``).
        num_heads, head_dim, num_layers: plain ints of the model shape (≥ 1).
        include_backward: add the backward FLOPs.
        backward_factor: backward FLOPs / forward FLOPs (≥ 0).

    Returns:
        FLOPs: a Python int for an int input (exact when ``backward_factor`` is an integer,
        otherwise rounded), a float64 tensor of the same shape for a tensor input (no overflow
        of int64 at large counts).
    """
    for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attention_pairs_to_flops: {name} must be an int >= 1, got {value!r}")
    if backward_factor < 0:
        raise ValueError(f"attention_pairs_to_flops: backward_factor must be >= 0, got {backward_factor}")
    per_pair_forward = 4 * head_dim * num_heads * num_layers
    factor = 1 + backward_factor if include_backward else 1
    if isinstance(pairs, torch.Tensor):
        if pairs.dtype.is_floating_point or pairs.dtype.is_complex:
            raise ValueError(f"attention_pairs_to_flops: pairs must be an integer tensor, got {pairs.dtype}")
        return pairs.to(torch.float64) * float(per_pair_forward) * float(factor)
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise ValueError(
            f"attention_pairs_to_flops: pairs must be an int >= 0 or an int tensor, got {pairs!r}"
        )
    if float(factor).is_integer():
        return pairs * per_pair_forward * int(factor)
    return round(pairs * per_pair_forward * factor)
