"""Context-parallel sharding of packed THD micro-batches (load-balanced "2·c chunks" split).

A packed micro-batch holds ``n`` documents back to back; document ``i`` occupies the padded
span ``[cu_seqlens_padded[i], cu_seqlens_padded[i + 1])`` whose length ``P_i`` is a multiple
of ``2·c`` (``c`` = CP degree). Every span is cut into ``2·c`` equal chunks of ``s_i = P_i / (2c)``
tokens; CP rank ``r`` keeps chunks ``r`` and ``2c − 1 − r`` of every document, documents in
order. Causal attention work is then the same on every rank (a rank holding an early chunk
also holds the matching late one). This is the split of Transformer Engine's THD context
parallelism and of the planner's ``attention_cost``.

Example, one document of padded length 8 and ``c = 2`` (chunks of 2 tokens)::

    global  [ 0 1 | 2 3 | 4 5 | 6 7 ]
    rank 0  [ 0 1 ,             6 7 ]   chunks 0 and 3
    rank 1  [       2 3 , 4 5       ]   chunks 1 and 2

With ``c == 1`` sharding is the identity and spans need not be even.

Index tensors are built once per (layout, c, r) with vectorised torch ops (no Python loop
per token) and cached, because every layer of a micro-batch reuses them.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch

__all__ = [
    "cp_local_indices",
    "cp_position_ids",
    "shard_for_cp",
    "unshard_from_cp",
    "validate_cp_layout",
]

_IntSeq = torch.Tensor | Sequence[int]


# Host copies of device cu_seqlens tensors, keyed by the tensor object: every layer of a
# micro-batch passes the same tensor, so the device->host sync happens once per micro-batch,
# not once per layer. Entries hold a weak reference and the tensor's version counter, so a
# freed or modified tensor never returns a stale copy.
_HOST_COPIES: dict[int, tuple[weakref.ref, int, tuple[int, ...]]] = {}
_HOST_COPIES_MAX = 16


def _as_tuple(cu: _IntSeq, name: str) -> tuple[int, ...]:
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1:
            raise ValueError(f"{name} must be 1-D [n+1], got shape {tuple(cu.shape)}")
        if cu.dtype.is_floating_point or cu.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers (int32), got {cu.dtype}")
        if cu.device.type == "cpu":
            return tuple(int(v) for v in cu.tolist())
        return _host_copy_cached(cu)
    return tuple(int(v) for v in cu)


def _host_copy_cached(cu: torch.Tensor) -> tuple[int, ...]:
    hit = _HOST_COPIES.get(id(cu))
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        return hit[2]
    host = tuple(int(v) for v in cu.tolist())  # device sync: pass host lists to avoid it
    if len(_HOST_COPIES) >= _HOST_COPIES_MAX:
        _HOST_COPIES.clear()
    _HOST_COPIES[id(cu)] = (weakref.ref(cu), cu._version, host)
    return host


def validate_cp_layout(
    cu_seqlens_padded: _IntSeq, cp_size: int, cp_rank: int | None = None
) -> tuple[int, ...]:
    """Check a padded THD layout for CP degree ``cp_size``; return ``cu_seqlens_padded`` as a tuple.

    Raises ``ValueError`` naming the first offending document and the fix.
    """
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if cp_rank is not None and not (0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")
    cu = _as_tuple(cu_seqlens_padded, "cu_seqlens_padded")
    if len(cu) < 1 or cu[0] != 0:
        raise ValueError(f"cu_seqlens_padded must start with 0 (shape [n+1]), got {list(cu[:4])}...")
    step = 2 * cp_size if cp_size > 1 else 1
    for i in range(len(cu) - 1):
        span = cu[i + 1] - cu[i]
        if span < 0:
            raise ValueError(f"cu_seqlens_padded must be non-decreasing; document {i} has length {span}")
        if span % step:
            raise ValueError(
                f"document {i} has padded length {span}, not a multiple of 2*cp = {step}: "
                f"pad every document to a multiple of 2*cp (the planner does this for cp > 1)"
            )
    return cu


def _check_real(cu_real: tuple[int, ...], cu_padded: tuple[int, ...]) -> None:
    if len(cu_real) != len(cu_padded):
        raise ValueError(
            f"cu_seqlens has {len(cu_real)} entries but cu_seqlens_padded has {len(cu_padded)}: both are [n+1]"
        )
    if cu_real and cu_real[0] != 0:
        raise ValueError("cu_seqlens must start with 0")
    for i in range(len(cu_real) - 1):
        real = cu_real[i + 1] - cu_real[i]
        padded = cu_padded[i + 1] - cu_padded[i]
        if not 0 <= real <= padded:
            raise ValueError(
                f"document {i}: real length {real} must be in [0, padded length {padded}] "
                f"(cu_seqlens holds real lengths, cu_seqlens_padded the padded spans)"
            )


@functools.lru_cache(maxsize=16)
def _local_indices_cpu(cu: tuple[int, ...], cp_size: int, cp_rank: int) -> torch.Tensor:
    if cp_size == 1:
        return torch.arange(cu[-1] if cu else 0, dtype=torch.long)
    starts = torch.tensor(cu[:-1], dtype=torch.long)
    chunk = (torch.tensor(cu[1:], dtype=torch.long) - starts) // (2 * cp_size)
    # Two segments per document: chunk r, then chunk 2c-1-r.
    seg_start = torch.stack(
        [starts + cp_rank * chunk, starts + (2 * cp_size - 1 - cp_rank) * chunk], 1
    ).reshape(-1)
    seg_len = torch.stack([chunk, chunk], 1).reshape(-1)
    total = int(seg_len.sum())
    seg_local_start = torch.cumsum(seg_len, 0) - seg_len
    offset_in_seg = torch.arange(total, dtype=torch.long) - torch.repeat_interleave(seg_local_start, seg_len)
    return torch.repeat_interleave(seg_start, seg_len) + offset_in_seg


def cp_local_indices(
    cu_seqlens_padded: _IntSeq, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global token index of every local position on CP rank ``cp_rank``.

    Returns int64 ``[T_padded / cp_size]`` (``T_padded = cu_seqlens_padded[-1]``), increasing
    within each chunk, documents in order: ``x_local = x[cp_local_indices(...)]``.
    """
    cu = validate_cp_layout(cu_seqlens_padded, cp_size, cp_rank)
    idx = _local_indices_cpu(cu, cp_size, cp_rank)
    return idx if device is None else idx.to(device)


def cp_position_ids(
    cu_seqlens_padded: _IntSeq, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Position of every local token inside its document (RoPE position ids), int64 ``[T_padded / cp]``.

    Positions restart at 0 at every document's padded start; padding tokens continue the count.
    """
    cu = validate_cp_layout(cu_seqlens_padded, cp_size, cp_rank)
    idx = _local_indices_cpu(cu, cp_size, cp_rank)
    starts = torch.tensor(cu, dtype=torch.long)
    doc = torch.searchsorted(starts, idx, right=True) - 1
    pos = idx - starts[doc]
    return pos if device is None else pos.to(device)


def shard_for_cp(x: torch.Tensor, cu_seqlens_padded: _IntSeq, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Keep CP rank ``cp_rank``'s share of a packed tensor.

    Args:
        x: ``[T_padded, ...]`` any dtype, ``T_padded == cu_seqlens_padded[-1]``.
        cu_seqlens_padded: int ``[n+1]`` padded document boundaries, each span a multiple of
            ``2·cp_size`` when ``cp_size > 1``.
        cp_size, cp_rank: CP degree and this rank's index in its CP group.
    Returns:
        ``[T_padded / cp_size, ...]`` (differentiable gather into a new tensor; with
        ``cp_size == 1`` ``x`` itself is returned).
    """
    cu = validate_cp_layout(cu_seqlens_padded, cp_size, cp_rank)
    total = cu[-1] if cu else 0
    if x.shape[0] != total:
        raise ValueError(
            f"x has {x.shape[0]} tokens but cu_seqlens_padded[-1] = {total}: a trailing padding tail "
            f"must be described as an extra document span in cu_seqlens_padded (real length 0)"
        )
    if cp_size == 1:
        return x
    return x.index_select(0, _local_indices_cpu(cu, cp_size, cp_rank).to(x.device))


@functools.lru_cache(maxsize=16)
def _unshard_perm_cpu(cu: tuple[int, ...], cp_size: int) -> torch.Tensor:
    gathered_to_global = torch.cat([_local_indices_cpu(cu, cp_size, r) for r in range(cp_size)])
    return torch.argsort(gathered_to_global)


def unshard_from_cp(
    locals_or_gathered: torch.Tensor | Sequence[torch.Tensor], cu_seqlens_padded: _IntSeq, cp_size: int
) -> torch.Tensor:
    """Inverse of :func:`shard_for_cp`.

    Args:
        locals_or_gathered: either the list of the ``cp_size`` local shards in CP-rank order,
            each ``[T_padded / cp, ...]``, or their concatenation ``[T_padded, ...]`` (what an
            all-gather along dim 0 returns).
    Returns:
        ``[T_padded, ...]`` in global (document) order. Differentiable.
    """
    cu = validate_cp_layout(cu_seqlens_padded, cp_size)
    if isinstance(locals_or_gathered, torch.Tensor):
        gathered = locals_or_gathered
    else:
        parts = list(locals_or_gathered)
        if len(parts) != cp_size:
            raise ValueError(f"expected {cp_size} local shards (one per CP rank), got {len(parts)}")
        gathered = torch.cat(parts, 0)
    total = cu[-1] if cu else 0
    if gathered.shape[0] != total:
        raise ValueError(f"gathered shards hold {gathered.shape[0]} tokens, cu_seqlens_padded[-1] = {total}")
    if cp_size == 1:
        return gathered
    return gathered.index_select(0, _unshard_perm_cpu(cu, cp_size).to(gathered.device))
