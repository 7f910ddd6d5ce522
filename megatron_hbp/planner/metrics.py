"""Plan metrics (HBP.md section 2), computed from the plan arrays in one vectorised pass.

Definitions adopted here (per step = per optimizer iteration; a replica is one CP group; a
replica's share of a step is the sum over all its micro-batches, since with gradient
accumulation and no per-micro-batch synchronisation the step waits for the slowest replica's
whole sequence of micro-batches):

- ``PR``  padding ratio of a step = (sum over its packs of pack_length - real tokens) /
  (packs * pack_length). Counts CP padding, unused pack space and empty packs alike.
- ``DBR`` data balance ratio = sum_i (T_max - T_i) / (T_max * N), ``T_i`` real tokens of replica i.
- ``ABR`` attention balance ratio = same with ``A_i`` = sum of l^2 over replica i's samples.
- ``ave_tokens`` = real tokens of the step / world_size (tokens per device per iteration; a
  device = one data x context parallel rank).
- The run's PR/DBR/ABR/ave_tokens are the mean over steps (per group: over that group's steps).
- ``CR`` = real tokens in steps with cp > 1 / all real tokens (a ratio of totals; per group it
  is 1 for a CP group and 0 otherwise).
Extra: ``slot_ABR`` (ABR among the packs of one micro-batch slot across replicas, i.e. the
packs running side by side, mean over slots and steps) and ``cp_rank_max_over_mean`` (zigzag
per-rank causal pairs inside each replica, max/mean, mean over replicas of CP steps).
"""

from __future__ import annotations

import numpy as np

from megatron_hbp.planner.plan import DROP_REASONS, Plan


def _ratio(mx: np.ndarray, total: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sum_i (max - x_i) / (max * n) = 1 - total / (n * max); 0 where max == 0."""
    out = np.zeros(len(mx), dtype=np.float64)
    nz = mx > 0
    out[nz] = 1.0 - total[nz] / (n[nz] * mx[nz])
    return np.maximum(out, 0.0)


def step_metrics(plan: Plan) -> dict[str, np.ndarray]:
    """Per-step arrays ``[S]``: PR, DBR, ABR, slot_ABR, ave_tokens, tokens, attn_max_over_mean, cp."""
    a = plan.arrays
    S = plan.num_steps
    groups = plan.groups
    sg = a["step_group"].astype(np.int64)
    cp = np.array([g.cp for g in groups], dtype=np.int64)[sg]
    cap = np.array([g.pack_length for g in groups], dtype=np.float64)[sg]
    R = plan.world_size // cp
    m = a["step_micro_batches"].astype(np.int64)
    spo = a["step_pack_offsets"]
    npk = np.diff(spo)
    wl = plan.workload
    tok_p = wl.pack_tokens.astype(np.float64)
    attn_p = wl.pack_sum_sq.astype(np.float64)
    step_of_pack = wl.pack_step
    rep_off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(R, out=rep_off[1:])
    rep = rep_off[:-1][step_of_pack] + wl.pack_replica
    nrep = int(rep_off[-1])
    T = np.bincount(rep, weights=tok_p, minlength=nrep)
    A = np.bincount(rep, weights=attn_p, minlength=nrep)
    starts = rep_off[:-1]
    out: dict[str, np.ndarray] = {}
    if S == 0:
        keys = ("PR", "DBR", "ABR", "slot_ABR", "ave_tokens", "tokens", "cp", "attn_max_over_mean")
        return {k: np.zeros(0) for k in keys}
    Tsum = np.add.reduceat(T, starts)
    Asum = np.add.reduceat(A, starts)
    out["tokens"] = Tsum
    out["PR"] = 1.0 - Tsum / (npk * cap)
    out["DBR"] = _ratio(np.maximum.reduceat(T, starts), Tsum, R.astype(np.float64))
    out["ABR"] = _ratio(np.maximum.reduceat(A, starts), Asum, R.astype(np.float64))
    out["attn_max_over_mean"] = np.where(
        Asum > 0, np.maximum.reduceat(A, starts) * R / np.maximum(Asum, 1e-300), 1.0
    )
    out["ave_tokens"] = Tsum / plan.world_size
    out["cp"] = cp
    # slot balance: group packs by (step, slot k)
    slot = wl.pack_micro_batch
    slot_off = np.zeros(S + 1, dtype=np.int64)
    np.cumsum(m, out=slot_off[1:])
    slot_id = slot_off[:-1][step_of_pack] + slot
    order = np.argsort(slot_id, kind="stable")
    sid = slot_id[order]
    sstart = np.concatenate([[0], np.nonzero(np.diff(sid))[0] + 1])
    sa = attn_p[order]
    smx = np.maximum.reduceat(sa, sstart)
    ssum = np.add.reduceat(sa, sstart)
    sn = np.diff(np.append(sstart, len(sid))).astype(np.float64)
    sabr = _ratio(smx, ssum, sn)
    out["slot_ABR"] = np.bincount(np.repeat(np.arange(S), m), weights=sabr, minlength=S) / m
    return out


def cp_rank_balance(plan: Plan) -> dict[int, float]:
    """Per CP group index: mean over replicas of (max rank / mean rank) zigzag causal pairs
    (``plan.workload.entry_zigzag_pairs`` summed over each replica's micro-batches)."""
    wl = plan.workload
    sg = plan.arrays["step_group"].astype(np.int64)
    pack_group = sg[wl.pack_step]
    res = {}
    for gi, g in enumerate(plan.groups):
        if g.cp == 1:
            continue
        packs = np.nonzero(pack_group == gi)[0]  # step order, replica-major inside a step
        if len(packs) == 0:
            continue
        c = wl.entry_zigzag_pairs[(wl.entry_offsets[packs][:, None] + np.arange(g.cp)[None, :]).reshape(-1)]
        c = c.reshape(-1, g.cp)
        rep_start = np.nonzero(wl.pack_micro_batch[packs] == 0)[0]  # first pack of each replica
        per_rep = np.add.reduceat(c, rep_start, axis=0).astype(np.float64)
        mean = per_rep.mean(axis=1)
        ok = mean > 0
        v = per_rep.max(axis=1)[ok] / mean[ok]
        res[gi] = float(v.mean()) if len(v) else 1.0
    return res


def compute_metrics(plan: Plan, *, cp_balance: bool = True) -> dict:
    """Overall and per-group metrics as a JSON-ready dict (definitions in the module docstring)."""
    sm = step_metrics(plan)
    a = plan.arrays
    sg = a["step_group"]
    tokens = sm["tokens"]
    total = float(tokens.sum())
    cpt = float(tokens[sm["cp"] > 1].sum())

    def mean(x, mask=None):
        x = x if mask is None else x[mask]
        return float(x.mean()) if len(x) else 0.0

    cpb = cp_rank_balance(plan) if cp_balance else {}
    per_group = []
    poff = a["pack_offsets"]
    spo = a["step_pack_offsets"]
    step_samples = poff[spo[1:]] - poff[spo[:-1]]
    for gi, g in enumerate(plan.groups):
        mask = sg == gi
        steps = np.nonzero(mask)[0]
        npacks = int(np.diff(spo)[steps].sum())
        nsamp = int(step_samples[steps].sum())
        gt = float(tokens[mask].sum())
        per_group.append(
            {
                "group": gi,
                "pack_length": g.pack_length,
                "cp": g.cp,
                "recompute_layers": g.recompute_layers,
                "num_steps": len(steps),
                "num_packs": npacks,
                "num_samples": nsamp,
                "tokens": int(gt),
                "token_share": gt / total if total else 0.0,
                "PR": mean(sm["PR"], mask),
                "DBR": mean(sm["DBR"], mask),
                "ABR": mean(sm["ABR"], mask),
                "CR": 1.0 if g.cp > 1 else 0.0,
                "ave_tokens": mean(sm["ave_tokens"], mask),
                "slot_ABR": mean(sm["slot_ABR"], mask),
                "attn_max_over_mean": mean(sm["attn_max_over_mean"], mask),
                "cp_rank_max_over_mean": cpb.get(gi),
            }
        )
    d = plan.dropped
    return {
        "PR": mean(sm["PR"]),
        "DBR": mean(sm["DBR"]),
        "ABR": mean(sm["ABR"]),
        "CR": cpt / total if total else 0.0,
        "ave_tokens": mean(sm["ave_tokens"]),
        "slot_ABR": mean(sm["slot_ABR"]),
        "attn_max_over_mean": mean(sm["attn_max_over_mean"]),
        "num_steps": plan.num_steps,
        "num_packs": len(poff) - 1,
        "num_samples": plan.num_samples,
        "num_placed": int(len(a["samples"])),
        "num_dropped": len(d),
        "dropped_by_reason": d.counts(),
        "drop_reasons": list(DROP_REASONS),
        "total_tokens": int(total),
        "world_size": plan.world_size,
        "epochs": plan.config.epochs,
        "per_group": per_group,
    }
