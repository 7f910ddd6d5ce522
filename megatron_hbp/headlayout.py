"""Which attention heads each context-parallel rank holds under Ulysses (pure Python).

One rule, used by ``megatron_hbp.cp.ulysses`` (the all-to-all), the cost model (bytes sent,
memory) and the trainer's pre-flight (config-time errors). No torch, no NumPy.
"""

from __future__ import annotations

import functools

__all__ = ["check_ulysses_heads", "kv_heads_per_rank"]


def check_ulysses_heads(num_heads: int, num_kv_heads: int, cp_size: int) -> str | None:
    """``None`` when Ulysses can run ``num_heads`` query / ``num_kv_heads`` K/V heads (per TP rank)
    on ``cp_size`` ranks, else the reason (one line, with the fix)."""
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"query heads ({num_heads}) must be a positive multiple of key/value heads ({num_kv_heads})"
    if cp_size < 1 or num_heads % cp_size:
        return (
            f"Ulysses context parallelism splits the {num_heads} query heads per tensor-parallel rank over "
            f"cp={cp_size} ranks, which needs heads divisible by cp; use cp dividing {num_heads} or "
            "cp_backend: allgather"
        )
    return None


@functools.lru_cache(maxsize=64)
def kv_heads_per_rank(num_heads: int, num_kv_heads: int, cp_size: int) -> tuple[tuple[int, ...], ...]:
    """The K/V heads each CP rank receives, in the order its query heads read them.

    Query head ``h`` reads K/V head ``h // (H / H_kv)`` (Megatron's grouping). Rank ``j`` holds
    query heads ``[j·H/c, (j+1)·H/c)`` and receives ``m`` K/V heads (the same ``m`` on every
    rank): ``H_kv / c`` when whole groups fit on a rank, one (replicated to several ranks) when a
    group spans ranks evenly, else one copy per query head. Query head ``i`` of the rank reads its
    K/V head ``i // (H/c / m)``.
    """
    err = check_ulysses_heads(num_heads, num_kv_heads, cp_size)
    if err:
        raise ValueError(err)
    group = num_heads // num_kv_heads  # query heads per K/V head
    hq_r = num_heads // cp_size
    out = []
    for j in range(cp_size):
        if hq_r % group == 0:  # whole K/V groups on this rank
            heads = tuple(range(j * hq_r // group, (j + 1) * hq_r // group))
        elif group % hq_r == 0:  # all of this rank's query heads read one K/V head
            heads = (j * hq_r // group,)
        else:  # groups straddle ranks: one K/V copy per query head
            heads = tuple(h // group for h in range(j * hq_r, (j + 1) * hq_r))
        out.append(heads)
    return tuple(out)
