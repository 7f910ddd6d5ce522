"""Attention-balanced batching: which packs run in one step, on which replica, in which slot.

A step of a group with ``R`` replicas and ``m`` micro-batches per replica holds ``R*m`` packs.
The layout of ``S`` steps is an int array ``[S, R, m]`` of pack ids: ``layout[s, r, k]`` is the
pack that replica ``r`` runs as its ``k``-th micro-batch. The step's time is set by the slowest
replica (sum over its micro-batches), so the objective is the max replica cost; packs in the
same slot run side by side, so they should also be alike.

Methods:
- ``none``: random order (what a plain shuffled data loader does).
- ``sort``: the paper's attention sort: packs by decreasing sum(l^2), cut into steps of ``R*m``;
  inside a step slot-major (slot ``k`` holds sorted packs ``k*R .. k*R+R-1``, replica ``r`` the
  ``r``-th of them).
- ``lpt``: ours. Cost ``a*tokens + sum(l^2)``; packs by decreasing cost, cut into steps (as
  ``sort``, so side-by-side packs are alike); inside each step a cardinality-constrained LPT
  (round ``k`` gives the ``R`` next-heaviest packs, heaviest to the currently lightest replica),
  then pairwise-swap refinement (move the best pack pair between the heaviest replica and any
  other while that lowers the step's max), then each replica's packs are ordered by decreasing
  cost so slot ``k`` holds every replica's ``k``-th heaviest pack. Vectorised over steps.
"""

from __future__ import annotations

import numpy as np


def pack_cost(tokens: np.ndarray, attn: np.ndarray, linear_coef: float) -> np.ndarray:
    """Balancing cost of packs: ``linear_coef * tokens + attn`` (float64 ``[P]``).

    ``tokens`` are the tokens a pack computes (padded), ``attn`` its sum of l^2 (real lengths).
    """
    return linear_coef * tokens.astype(np.float64) + attn.astype(np.float64)


def _slot_major(order: np.ndarray, S: int, R: int, m: int) -> np.ndarray:
    return order[: S * R * m].reshape(S, m, R).transpose(0, 2, 1).copy()


def _lpt_layout(C: np.ndarray, R: int, m: int, swap_iterations: int) -> np.ndarray:
    """``C [S, R*m]`` costs sorted decreasing per row -> members ``[S, R, m]`` positions into C's rows."""
    S = C.shape[0]
    members = np.empty((S, R, m), dtype=np.int64)
    sums = np.zeros((S, R), dtype=np.float64)
    rows = np.arange(S)[:, None]
    for k in range(m):
        light = np.argsort(sums, axis=1, kind="stable")
        pos = k * R + np.arange(R)
        members[rows, light, k] = pos[None, :]
        sums[rows, light] += C[:, pos]
    if m > 1 and R > 1 and swap_iterations > 0:
        active = np.arange(S)
        for _ in range(swap_iterations):
            if len(active) == 0:
                break
            mem = members[active]  # [A, R, m]
            cm = np.take_along_axis(
                C[active][:, None, :], mem.reshape(len(active), 1, R * m), axis=2
            ).reshape(len(active), R, m)
            sm = sums[active]
            a = np.argmax(sm, axis=1)
            ar = np.arange(len(active))
            ca = cm[ar, a]  # [A, m]
            delta = ca[:, None, :, None] - cm[:, :, None, :]  # [A, R, m_a, m_b]: a gives i, takes j
            new_a = sm[ar, a][:, None, None, None] - delta
            new_b = sm[:, :, None, None] + delta
            pair_max = np.maximum(new_a, new_b)
            pair_max[ar, a] = np.inf
            flat = pair_max.reshape(len(active), -1)
            best = np.argmin(flat, axis=1)
            best_val = flat[ar, best]
            cur = sm[ar, a]
            improve = best_val < cur * (1.0 - 1e-12)
            if not improve.any():
                break
            idx = np.nonzero(improve)[0]
            b, rest = np.divmod(best[idx], m * m)
            i, j = np.divmod(rest, m)
            rows_g = active[idx]
            ai = a[idx]
            pa = members[rows_g, ai, i].copy()
            pb = members[rows_g, b, j].copy()
            members[rows_g, ai, i] = pb
            members[rows_g, b, j] = pa
            d = C[rows_g, pa] - C[rows_g, pb]
            sums[rows_g, ai] -= d
            sums[rows_g, b] += d
            active = rows_g
    # Slot k = each replica's k-th heaviest pack, so side-by-side packs are alike.
    cm = np.take_along_axis(C[:, None, :], members.reshape(S, 1, R * m), axis=2).reshape(S, R, m)
    slot_order = np.argsort(-cm, axis=2, kind="stable")
    return np.take_along_axis(members, slot_order, axis=2)


def balance_layout(
    method: str,
    attn: np.ndarray,
    cost: np.ndarray,
    R: int,
    m: int,
    rng: np.random.Generator,
    swap_iterations: int = 64,
) -> np.ndarray:
    """Arrange ``P = S*R*m`` packs into ``S`` steps.

    Args:
        method: 'none' | 'sort' | 'lpt'.
        attn: ``[P]`` sum of l^2 per pack (the paper's sort key).
        cost: ``[P]`` balancing cost per pack (``pack_cost``; used by 'lpt').
        R, m: replicas per step and micro-batches per replica.
        rng: for 'none' and for ties.
    Returns:
        ``[S, R, m] int64`` pack ids; steps of 'sort'/'lpt' come heaviest first.
    """
    P = len(attn)
    if P % (R * m):
        raise ValueError(f"balance_layout: {P} packs is not a multiple of R*m = {R * m}")
    S = P // (R * m)
    if S == 0:
        return np.zeros((0, R, m), dtype=np.int64)
    if method == "none":
        return _slot_major(rng.permutation(P).astype(np.int64), S, R, m)
    if method == "sort":
        order = np.argsort(-attn.astype(np.float64), kind="stable")
        return _slot_major(order.astype(np.int64), S, R, m)
    if method == "lpt":
        order = np.argsort(-cost, kind="stable").astype(np.int64)
        C = cost[order].reshape(S, R * m)
        members = _lpt_layout(C, R, m, swap_iterations)
        return order.reshape(S, R * m)[np.arange(S)[:, None, None], members]
    raise ValueError(f"unknown balance method '{method}' (none | sort | lpt)")


def replica_sums(layout: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[S, R]`` per-replica sums of ``values[pack]`` over micro-batches (-1 = empty pack = 0)."""
    v = np.where(layout >= 0, values[np.maximum(layout, 0)], 0.0)
    return v.sum(axis=2)


def max_over_mean(sums: np.ndarray) -> np.ndarray:
    """``[S]`` max replica value / mean replica value of each step (1.0 = perfect; 1.0 when all zero)."""
    mx = sums.max(axis=1)
    mean = sums.mean(axis=1)
    out = np.ones(len(sums), dtype=np.float64)
    nz = mean > 0
    out[nz] = mx[nz] / mean[nz]
    return out
