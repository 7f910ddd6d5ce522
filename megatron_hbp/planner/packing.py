"""Grouping, CP padding, bin packing (ISF, best-fit decreasing) and GreedyFill.

All functions take integer sizes in tokens (``int32``/``int64`` arrays) and return, per item,
the index of its bin (``int64``, -1 = not placed). Items of one bin keep the order in which
the packer placed them. Nothing here imports torch.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort

import numpy as np


def group_data(lengths: np.ndarray, pack_lengths: np.ndarray | list[int]) -> np.ndarray:
    """Group index of every sample: ``i`` when ``pack_lengths[i-1] < len <= pack_lengths[i]``.

    Args:
        lengths: ``[N]`` int, real token counts (> 0).
        pack_lengths: ``[G]`` strictly increasing pack lengths.
    Returns:
        ``[N] int64``; ``G`` marks a sample longer than every group.
    """
    return np.searchsorted(np.asarray(pack_lengths, dtype=np.int64), lengths, side="left").astype(np.int64)


def cp_padded(lengths: np.ndarray, cp: int) -> np.ndarray:
    """Lengths rounded up to a multiple of ``2*cp`` (unchanged for ``cp == 1``); same dtype as input."""
    if cp <= 1:
        return lengths
    m = 2 * cp
    return ((lengths + (m - 1)) // m) * m


def next_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Next-fit in the given order: a new bin opens when the next item does not fit.

    Returns ``[n] int64`` bin index per item (bins numbered in order). Every size must be
    ``<= capacity``. Runs one ``searchsorted`` per bin, not per item.
    """
    n = len(sizes)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    csum = np.cumsum(sizes, dtype=np.int64)
    start, b = 0, 0
    base = 0
    while start < n:
        end = int(np.searchsorted(csum, base + capacity, side="right"))
        out[start:end] = b
        base = int(csum[end - 1])
        start = end
        b += 1
    return out


def isf_pack(
    sizes: np.ndarray, capacity: int, rng: np.random.Generator, threshold: float = 0.989, iterations: int = 10
) -> np.ndarray:
    """The paper's ISF ("iterative sampling and filtering", OmniBal): shuffle, next-fit, keep the
    packs filled to at least ``threshold * capacity``, re-shuffle and re-pack the rest; the last
    of ``iterations`` rounds keeps every pack.

    Returns ``[n] int64`` bin per item; bins are numbered in the order they were kept.
    """
    n = len(sizes)
    bins = np.full(n, -1, dtype=np.int64)
    order_out = []
    remaining = np.arange(n, dtype=np.int64)
    nbins = 0
    need = threshold * capacity
    for it in range(iterations):
        if len(remaining) == 0:
            break
        perm = remaining[rng.permutation(len(remaining))]
        b = next_fit(sizes[perm], capacity)
        nb = int(b[-1]) + 1
        if it == iterations - 1:
            keep_bin = np.ones(nb, dtype=bool)
        else:
            fill = np.bincount(b, weights=sizes[perm], minlength=nb)
            keep_bin = fill >= need
        new_id = np.cumsum(keep_bin) - 1 + nbins
        kept = keep_bin[b]
        bins[perm[kept]] = new_id[b[kept]]
        order_out.append(perm[kept])
        nbins += int(keep_bin.sum())
        remaining = perm[~kept]
    return bins


def stable_argsort_int(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative integer keys, as 1-2 O(n) radix passes
    of 16 bits (NumPy radix-sorts 16-bit keys; wider ones would fall back to timsort)."""
    keys = np.asarray(keys)
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    mx = int(keys.max())
    if int(keys.min()) < 0 or mx >= 2**32:
        return np.argsort(keys, kind="stable")
    if mx < 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    k = keys.astype(np.uint32, copy=False)
    o = np.argsort((k & 0xFFFF).astype(np.uint16), kind="stable")
    return o[np.argsort((k[o] >> 16).astype(np.uint16), kind="stable")]


def _sorted_desc(sizes: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Item indices by decreasing size; ties in random (seeded) order, or by index without rng.

    Two stable O(n) radix passes over 16-bit keys: first by a random 16-bit tie key, then by the
    size mapped to a dense uint16 key (divided by the sizes' common step, e.g. 2*cp) when it fits.
    """
    n = len(sizes)
    s = np.asarray(sizes)
    mx = int(s.max())
    key = mx - s.astype(np.int64)
    if mx > 65535:
        step = int(np.gcd.reduce(key))
        if step > 1:
            key //= step
    if int(key.max()) <= 65535:
        key = key.astype(np.uint16)
    if rng is None:
        return np.argsort(key, kind="stable")
    tie = np.argsort(rng.integers(0, 65536, n, dtype=np.uint16), kind="stable")
    return tie[np.argsort(key[tie], kind="stable")]


def best_fit_decreasing(
    sizes: np.ndarray,
    capacity: int,
    rng: np.random.Generator | None = None,
    gaps: np.ndarray | None = None,
    open_new: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: items by decreasing size, each into the open bin with the smallest
    free space that still holds it; a new bin opens only when none does.

    Exact BFD, computed per (size, free-space) bucket instead of per item: equal-size items
    placed into equally-free bins fill them identically, so one bucket operation places many
    items. Cost is about (distinct sizes) x log(bins), which packs 1M samples in well under a
    second.

    Args:
        sizes: ``[n]`` int item sizes, each ``<= capacity``.
        capacity: bin size.
        rng: breaks ties between equal sizes (None: by index).
        gaps: ``[B]`` free space of already existing bins (GreedyFill); None = no bins.
        open_new: False = never open bins (items that fit nowhere stay unplaced, bin -1).
    Returns:
        ``(bin_of_item [n] int64, gaps [B'] int64)``: the final free space of every bin.
    """
    sizes = np.asarray(sizes)
    n = len(sizes)
    bin_of = np.full(n, -1, dtype=np.int64)
    gap_init = np.zeros(0, dtype=np.int64) if gaps is None else np.asarray(gaps, dtype=np.int64)
    nbins = len(gap_init)
    if n == 0:
        return bin_of, gap_init.copy()
    if sizes.max() > capacity:
        raise ValueError(
            f"best_fit_decreasing: an item of size {int(sizes.max())} exceeds capacity {capacity}"
        )
    order = _sorted_desc(sizes, rng)
    sorted_sizes = sizes[order]
    first = np.concatenate([[0], np.nonzero(np.diff(sorted_sizes))[0] + 1])
    counts = np.diff(np.append(first, n))
    uniq = sorted_sizes[first].astype(np.int64).tolist()
    counts = counts.tolist()

    # gap -> list of bin ids with exactly that free space; `keys` = sorted non-empty gaps.
    buckets: dict[int, list[int]] = {}
    if nbins:
        go = np.argsort(gap_init, kind="stable")
        gs = gap_init[go]
        ukeys, starts = np.unique(gs, return_index=True)
        ends = np.append(starts[1:], len(gs))
        for k, a, b in zip(ukeys.tolist(), starts.tolist(), ends.tolist()):
            buckets[k] = go[a:b].tolist()[::-1]
    keys = sorted(buckets)

    placed_bins = array("q")  # bin of each placed item, in (size desc) order
    placed_cnt = array("q")  # how many consecutive items go to that bin
    placed_per_size = []

    def add(g: int, ids: list[int]) -> None:
        lst = buckets.get(g)
        if lst is None:
            buckets[g] = ids
            insort(keys, g)
        else:
            lst.extend(ids)

    for s, c in zip(uniq, counts):
        left = c
        while left > 0:
            i = bisect_left(keys, s)
            if i == len(keys):
                if not open_new:
                    break
                t = capacity // s
                full, rem = divmod(left, t)
                ids = list(range(nbins, nbins + full))
                nbins += full
                placed_bins.extend(ids)
                placed_cnt.extend([t] * full)
                if full:
                    add(capacity - t * s, ids)
                if rem:
                    placed_bins.append(nbins)
                    placed_cnt.append(rem)
                    add(capacity - rem * s, [nbins])
                    nbins += 1
                left = 0
                break
            g = keys[i]
            lst = buckets[g]
            t = g // s
            need = -(-left // t)
            take = min(len(lst), need)
            chosen = lst[len(lst) - take :]
            del lst[len(lst) - take :]
            if not lst:
                del buckets[g]
                keys.pop(i)
            if take == need:
                full, rem = divmod(left, t)
                fulls = chosen[:full]
                placed_bins.extend(fulls)
                placed_cnt.extend([t] * full)
                if fulls:
                    add(g - t * s, fulls)
                if rem:
                    placed_bins.append(chosen[full])
                    placed_cnt.append(rem)
                    add(g - rem * s, [chosen[full]])
                left = 0
            else:
                placed_bins.extend(chosen)
                placed_cnt.extend([t] * take)
                add(g - t * s, chosen)
                left -= take * t
        placed_per_size.append(c - left)

    pb = np.frombuffer(placed_bins, dtype=np.int64) if len(placed_bins) else np.zeros(0, np.int64)
    pc = np.frombuffer(placed_cnt, dtype=np.int64) if len(placed_cnt) else np.zeros(0, np.int64)
    item_bins = np.repeat(pb, pc)
    placed_per_size = np.asarray(placed_per_size, dtype=np.int64)
    if open_new or int(placed_per_size.sum()) == n:
        bin_of[order] = item_bins
    else:
        # Items of one size are placed in tie order: the first placed_per_size[k] of each size run.
        run_start = np.asarray(first, dtype=np.int64)
        rank_in_run = np.arange(n, dtype=np.int64) - np.repeat(run_start, np.asarray(counts))
        placed_mask = rank_in_run < np.repeat(placed_per_size, np.asarray(counts))
        bin_of[order[placed_mask]] = item_bins

    # Final gaps: rebuild from buckets (cheap: one entry per bin).
    out_gaps = np.zeros(nbins, dtype=np.int64)
    for g, ids in buckets.items():
        out_gaps[ids] = g
    return bin_of, out_gaps
