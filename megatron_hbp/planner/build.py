"""``build_plan``: lengths + config -> Plan (a pure, deterministic function).

Per epoch (own seed ``[seed, epoch]``), groups from the largest to the smallest:
1. GroupData: sample -> first group whose pack_length holds it; longer ones are dropped
   (reason ``too_long``) or raise, by ``too_long``.
2. Pack the group's remaining samples (sizes = lengths padded to a multiple of 2*cp) with
   ``isf`` or ``bfd``.
3. GreedyFill: best-fit the not yet placed samples of all shorter groups (largest first) into
   the free space of this group's packs. Going from the largest group down means a sample is
   taken before its own group is packed, so no hole is left behind.
4. Last partial step: the packs beyond a multiple of ``replicas * micro_batches`` run as a
   step with fewer micro-batches (``shrink``, default: nothing dropped), as a full step padded
   with empty packs (``pad``), or are dropped, chosen at random per epoch (``drop``; a group with
   samples still gets at least one step).
5. Balance the packs into steps (``balance``).
Then the steps of all groups are ordered: curriculum (first K steps from the short groups),
the rest interleaved evenly (step ``j`` of a group with ``n`` steps at position ``(j+0.5)/n``),
each group's steps shuffled first.
"""

from __future__ import annotations

import time

import numpy as np

from megatron_hbp.planner.balance import balance_layout, max_over_mean, pack_cost, replica_sums
from megatron_hbp.planner.config import PlanConfig
from megatron_hbp.planner.packing import (
    best_fit_decreasing,
    cp_padded,
    group_data,
    isf_pack,
    stable_argsort_int,
)
from megatron_hbp.planner.plan import DROP_REASONS, Plan, lengths_digest
from megatron_hbp.planner.workload import pack_sums

TOO_LONG = DROP_REASONS.index("too_long")
PARTIAL = DROP_REASONS.index("partial_step")


class PlanInputError(ValueError):
    """The lengths / loss tokens given to the planner are unusable; the message says why."""


def _check_inputs(lengths, loss_tokens) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise PlanInputError(f"lengths must be a 1-D array, got shape {lengths.shape}")
    if len(lengths) == 0:
        raise PlanInputError("lengths is empty: there is nothing to plan (check the sample info / .npy file)")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise PlanInputError(f"lengths must be integers, got dtype {lengths.dtype}")
    bad = np.nonzero(lengths <= 0)[0]
    if len(bad):
        raise PlanInputError(
            f"{len(bad)} sample(s) have length <= 0 (first: index {int(bad[0])}, length {int(lengths[bad[0]])}); "
            "every sample needs at least one token: fix or filter the data"
        )
    if int(lengths.max()) >= 2**31:
        raise PlanInputError("a length does not fit int32")
    lengths = lengths.astype(np.int32, copy=False)
    if loss_tokens is None:
        loss_tokens = lengths
    loss_tokens = np.asarray(loss_tokens)
    if loss_tokens.shape != lengths.shape:
        raise PlanInputError(
            f"loss_tokens has shape {loss_tokens.shape}, lengths {lengths.shape}: they must match"
        )
    if not np.issubdtype(loss_tokens.dtype, np.integer):
        raise PlanInputError(f"loss_tokens must be integers, got dtype {loss_tokens.dtype}")
    bad = np.nonzero((loss_tokens < 0) | (loss_tokens > lengths))[0]
    if len(bad):
        i = int(bad[0])
        raise PlanInputError(
            f"{len(bad)} sample(s) have loss_tokens outside [0, length] (first: index {i}: "
            f"{int(loss_tokens[i])} loss tokens, length {int(lengths[i])})"
        )
    return lengths, loss_tokens.astype(np.int32, copy=False)


class _Timer:
    """Wall (``t``) and CPU (``cpu``) seconds per stage."""

    STAGES = ("grouping", "packing", "greedy_fill", "balancing", "ordering")

    def __init__(self):
        self.t = dict.fromkeys(self.STAGES, 0.0)
        self.cpu = dict.fromkeys(self.STAGES, 0.0)
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    def lap(self, name: str) -> None:
        now, cnow = time.perf_counter(), time.process_time()
        self.t[name] += now - self._t0
        self.cpu[name] += cnow - self._c0
        self._t0, self._c0 = now, cnow


def _interleave(seqs: list[np.ndarray]) -> np.ndarray:
    """Merge sequences evenly: element ``j`` of a length-``n`` sequence sits at ``(j+0.5)/n``."""
    keys, vals, tie = [], [], []
    for gi, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        keys.append((np.arange(n) + 0.5) / n)
        vals.append(s)
        tie.append(np.full(n, gi))
    if not vals:
        return np.zeros(0, dtype=np.int64)
    keys, vals, tie = np.concatenate(keys), np.concatenate(vals), np.concatenate(tie)
    return vals[np.lexsort((tie, keys))]


def order_steps(
    step_groups: np.ndarray,
    pack_lengths: list[int],
    curriculum_steps: int,
    curriculum_limit: int,
    rng: np.random.Generator | None,
) -> np.ndarray:
    """Training order of steps: ``[S]`` permutation of ``arange(S)``.

    Each group's steps are shuffled (``rng``; None keeps their order), the first
    ``curriculum_steps`` come from groups with ``pack_length <= curriculum_limit`` (interleaved
    evenly among them), the rest of all groups is interleaved evenly.
    """
    step_groups = np.asarray(step_groups)
    G = len(pack_lengths)
    per = []
    for g in range(G):
        ids = np.nonzero(step_groups == g)[0]
        if rng is not None:
            ids = ids[rng.permutation(len(ids))]
        per.append(ids)
    head = np.zeros(0, dtype=np.int64)
    if curriculum_steps > 0:
        elig = [per[g] if pack_lengths[g] <= curriculum_limit else per[g][:0] for g in range(G)]
        head = _interleave(elig)[:curriculum_steps]
        used = np.zeros(len(step_groups), dtype=bool)
        used[head] = True
        per = [p[~used[p]] for p in per]
    return np.concatenate([head, _interleave(per)]).astype(np.int64)


def _closest_run(sorted_costs: np.ndarray, w: int) -> int:
    """Start of the length-``w`` window of ascending ``sorted_costs`` with the smallest
    (max - min) / mean; 0 when ``w`` is 0 or covers everything."""
    n = len(sorted_costs)
    if w <= 0 or w >= n:
        return 0
    c = sorted_costs.astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(c)])
    mean = (csum[w:] - csum[:-w]) / w
    spread = (c[w - 1 :] - c[: n - w + 1]) / np.maximum(mean, 1e-300)
    return int(np.argmin(spread))


def _pack_group(sizes: np.ndarray, cap: int, config: PlanConfig, rng: np.random.Generator) -> np.ndarray:
    if config.packer == "isf":
        return isf_pack(sizes, cap, rng, config.isf_threshold, config.isf_iterations)
    return best_fit_decreasing(sizes, cap, rng)[0]


def _plan_epoch(lengths, loss_tokens, gid, config: PlanConfig, epoch: int, timer: _Timer, stats: dict):
    """One epoch: (steps as (group, micro_batches, [R*m] group-local pack ids, -1 = empty),
    per-group pack arrays (samples, offsets, loss tokens) in group order, dropped (samples, reason))."""
    rng = np.random.default_rng([config.seed, epoch])
    G = len(config.groups)
    N = len(lengths)
    placed = np.zeros(N, dtype=bool)
    group_samples, group_off, group_loss = [], [], []
    steps = []  # (group, micro_batches, flat pack ids (local to group, -1 empty))
    drops = []
    for g in range(G - 1, -1, -1):
        grp = config.groups[g]
        cap = grp.pack_length
        own = np.nonzero((gid == g) & ~placed)[0]
        timer.lap("grouping")
        own_sizes = cp_padded(lengths[own], grp.cp)
        bins = _pack_group(own_sizes, cap, config, rng) if len(own) else np.zeros(0, np.int64)
        placed[own] = True
        nb = int(bins.max()) + 1 if len(bins) else 0
        timer.lap("packing")
        items, item_bins = [own], [bins]
        if config.greedy_fill and g > 0 and nb:
            gaps = cap - np.bincount(bins, weights=own_sizes, minlength=nb).astype(np.int64)
            pool = np.nonzero((gid < g) & ~placed)[0]
            psz = cp_padded(lengths[pool], grp.cp)
            fits = psz <= gaps.max()
            pool, psz = pool[fits], psz[fits]
            pb, _ = best_fit_decreasing(psz, cap, rng, gaps=gaps, open_new=False)
            ok = pb >= 0
            items.append(pool[ok])
            item_bins.append(pb[ok])
            placed[pool[ok]] = True
            stats.setdefault("greedy_fill_samples", [0] * G)[g] += int(ok.sum())
        timer.lap("greedy_fill")
        items = np.concatenate(items)
        item_bins = np.concatenate(item_bins)
        order = stable_argsort_int(item_bins)
        samp = items[order]
        counts = np.bincount(item_bins, minlength=nb)
        off = np.zeros(nb + 1, dtype=np.int64)
        np.cumsum(counts, out=off[1:])
        pack_of = np.repeat(np.arange(nb), counts)
        pad, attn, loss = pack_sums(lengths[samp], loss_tokens[samp], pack_of, nb, grp.cp)
        timer.lap("packing")

        # Last partial step (q packs beyond whole steps). "shrink" (default): one more step with
        # ceil(q / R) micro-batches, the < R missing packs empty -- nothing dropped; "pad": one
        # more full step, the rest empty; "drop": q packs chosen at random (each sample is
        # dropped with the same probability q / nb whatever its length or its pack's fullness;
        # a new choice every epoch), except that a group with samples never gets 0 steps (then
        # "shrink"). The extra step takes the run of packs, consecutive in cost order, whose
        # costs are closest (so it balances too; removing a run keeps the rest sorted-contiguous).
        R, m = config.replicas(g), config.micro_batches(g)
        per_step = R * m
        q = nb % per_step
        cost = pack_cost(pad, attn, config.cost_linear_coef)
        key = cost if config.balance == "lpt" else attn.astype(np.float64)
        policy = config.last_step
        if policy == "drop" and 0 < nb < per_step:
            policy = "shrink"
            stats.setdefault("kept_by_one_step_rule", set()).add(g)
        mm, n_drop, n_empty = 0, 0, 0
        if q and policy == "pad":
            mm, n_empty = m, per_step - q
        elif q and policy == "shrink":
            mm = -(-q // R)
            n_empty = mm * R - q
        elif q:
            n_drop = q
        dropped_packs = np.sort(rng.choice(nb, n_drop, replace=False)) if n_drop else np.zeros(0, np.int64)
        kept = np.setdiff1d(np.arange(nb), dropped_packs)
        n_extra = q - n_drop
        by_cost = kept[np.lexsort((kept, key[kept]))]
        w0 = _closest_run(key[by_cost], n_extra)
        extra = np.sort(by_cost[w0 : w0 + n_extra])
        full = np.sort(np.concatenate([by_cost[:w0], by_cost[w0 + n_extra :]]))
        lay_pos = balance_layout(
            config.balance, attn[full], cost[full], R, m, rng, config.balance_swap_iterations
        )
        layout = full[lay_pos]
        for s in range(len(layout)):
            steps.append((g, m, layout[s].reshape(-1)))
        if mm:
            # Empty packs get cost 0 and id -1.
            ids = np.concatenate([extra, np.full(n_empty, -1, dtype=np.int64)])
            c_attn = np.concatenate([attn[extra], np.zeros(n_empty, np.int64)])
            c_cost = np.concatenate([cost[extra], np.zeros(n_empty)])
            lay = balance_layout(config.balance, c_attn, c_cost, R, mm, rng, config.balance_swap_iterations)
            steps.append((g, mm, ids[lay[0]].reshape(-1)))
        if len(dropped_packs):
            ds = np.concatenate([samp[off[p] : off[p + 1]] for p in dropped_packs])
            drops.append((ds, PARTIAL))
        _record_balance(stats, g, config, attn[full], cost[full], R, m, rng, lay_pos)
        timer.lap("balancing")
        group_samples.append(samp)
        group_off.append(off)
        group_loss.append(loss)
    # groups were processed largest first; put them back in group order
    group_samples.reverse()
    group_off.reverse()
    group_loss.reverse()
    return steps, group_samples, group_off, group_loss, drops


def _record_balance(stats, g, config, attn, cost, R, m, rng, chosen) -> None:
    """Per-step max/mean replica cost of none / sort / lpt on the same packs (for the report/plots).

    ``chosen`` is the configured method's layout in positions of ``attn``/``cost``.
    """
    if len(attn) == 0:
        return
    b = stats.setdefault("balance", {}).setdefault(g, {})
    sub = np.random.default_rng(rng.integers(2**63))
    a64 = attn.astype(np.float64)
    for method in ("none", "sort", "lpt"):
        if method == config.balance:
            lay = chosen
        else:
            lay = balance_layout(method, attn, cost, R, m, sub, config.balance_swap_iterations)
        e = b.setdefault(method, {"cost": [], "attn": []})
        e["cost"].append(max_over_mean(replica_sums(lay, cost)))
        e["attn"].append(max_over_mean(replica_sums(lay, a64)))


DROP_WARN_FRACTION = 0.001
"""A plan that drops more than this fraction of its sample-epochs gets a warning line."""


def _bucket_label(b: int) -> str:
    return "1-16" if b == 0 else f"{2 ** (b + 3) + 1}-{2 ** (b + 4)}"


def drop_summary(lengths: np.ndarray, gid: np.ndarray, arrays: dict, config: PlanConfig) -> dict:
    """Dropped samples by length bucket (``1-16``, ``17-32``, ... tokens: dropped / planned
    sample-epochs), the dropped fraction, the (epoch, group) pairs that lost every sample of the
    group, and ``warning``: one line when more than 0.1 % of the sample-epochs or any whole group
    was dropped (else None)."""
    G = len(config.groups)
    n_total = len(lengths) * config.epochs
    idx, reasons, epochs = arrays["dropped_indices"], arrays["dropped_reasons"], arrays["dropped_epochs"]
    bucket = np.maximum(np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64) - 4, 0)
    nb = int(bucket.max()) + 1
    have = np.bincount(bucket, minlength=nb) * config.epochs
    lost = np.bincount(bucket[idx], minlength=nb)
    by_length = {_bucket_label(b): [int(lost[b]), int(have[b])] for b in range(nb) if have[b]}
    own = np.bincount(gid, minlength=G + 1)[:G]
    whole = []
    for e in range(config.epochs):
        sel = idx[(epochs == e) & (reasons == PARTIAL)]
        lost_g = np.bincount(gid[sel], minlength=G + 1)[:G]
        whole += [[e, g] for g in range(G) if own[g] and lost_g[g] == own[g]]
    frac = len(idx) / n_total if n_total else 0.0
    warning = None
    if len(idx) and (frac > DROP_WARN_FRACTION or whole):
        counts = {r: int((reasons == i).sum()) for i, r in enumerate(DROP_REASONS) if (reasons == i).any()}
        worst = ", ".join(f"{k} tokens {v[0]}/{v[1]}" for k, v in by_length.items() if v[0])
        fixes = []
        if counts.get("partial_step"):
            fixes.append("last_step: shrink keeps every sample of a partial step")
        if counts.get("too_long"):
            fixes.append("add a larger group or preprocess with --max-length to keep the too_long samples")
        lost_groups = (
            "; whole groups lost (epoch, group): " + ", ".join(f"({e}, {g})" for e, g in whole)
            if whole
            else ""
        )
        warning = (
            f"warning: the plan drops {len(idx)} of {n_total} sample-epochs ({100 * frac:.2f} %: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"){lost_groups}; dropped by length: {worst}; "
            + "; ".join(fixes)
        )
    return {"by_length": by_length, "fraction": frac, "whole_groups_dropped": whole, "warning": warning}


def build_plan(
    lengths: np.ndarray,
    loss_tokens: np.ndarray | None,
    config: PlanConfig,
    *,
    fingerprint: str | None = None,
) -> Plan:
    """Plan training steps for samples of the given lengths.

    Args:
        lengths: ``[N]`` int real token count per sample (> 0).
        loss_tokens: ``[N]`` int tokens with a loss per sample (``0 <= loss <= length``); None = lengths.
        config: the PlanConfig.
        fingerprint: the sample info's fingerprint, stored in the plan for later checks.
    Returns:
        Plan; ``plan.stats`` holds stage timings (s) and the balancer comparison.
    """
    t_start = time.perf_counter()
    c_start = time.process_time()
    timer = _Timer()
    lengths, loss_tokens = _check_inputs(lengths, loss_tokens)
    N = len(lengths)
    G = len(config.groups)
    pack_lengths = [g.pack_length for g in config.groups]
    gid = group_data(lengths, pack_lengths).astype(np.int8 if G < 127 else np.int32)
    too_long = np.nonzero(gid == G)[0]
    if len(too_long) and config.too_long == "error":
        i = int(too_long[0])
        raise PlanInputError(
            f"{len(too_long)} sample(s) are longer than the largest group ({pack_lengths[-1]} tokens); first: "
            f"index {i}, length {int(lengths[i])}. Add a larger group, truncate the data, or set too_long: drop"
        )
    timer.lap("grouping")
    stats: dict = {}
    all_samples, all_lengths, all_poff, all_ploss = [], [], [], []
    all_sg, all_smb, all_spo, all_se, all_sl = [], [], [], [], []
    d_idx, d_rsn, d_ep = [], [], []
    pack_total, samp_total = 0, 0
    for epoch in range(config.epochs):
        steps, gs, goff, gloss, drops = _plan_epoch(lengths, loss_tokens, gid, config, epoch, timer, stats)
        if len(too_long):
            drops.insert(0, (too_long, TOO_LONG))
        for ds, r in drops:
            d_idx.append(ds.astype(np.int64))
            d_rsn.append(np.full(len(ds), r, dtype=np.int8))
            d_ep.append(np.full(len(ds), epoch, dtype=np.int32))
        step_groups = np.array([s[0] for s in steps], dtype=np.int32)
        rng = np.random.default_rng([config.seed, epoch, 1])
        order = order_steps(
            step_groups,
            pack_lengths,
            config.curriculum_steps if epoch == 0 else 0,
            config.curriculum_limit,
            rng,
        )
        # Global pack table over groups, plus one empty pack (id = total) for padding.
        glob_start = np.concatenate([goff[g][:-1] + sum(len(gs[h]) for h in range(g)) for g in range(G)])
        glob_len = np.concatenate([np.diff(goff[g]) for g in range(G)])
        glob_loss = np.concatenate(gloss)
        cat_samples = np.concatenate(gs)
        base_of = np.cumsum([0] + [len(goff[g]) - 1 for g in range(G)])
        empty = len(glob_len)
        glob_start = np.append(glob_start, 0)
        glob_len = np.append(glob_len, 0)
        glob_loss = np.append(glob_loss, 0)
        seq, mb, nper = [], [], []
        for s in order:
            g, m, ids = steps[s]
            seq.append(np.where(ids >= 0, ids + base_of[g], empty))
            mb.append(m)
            nper.append(len(ids))
        seq = np.concatenate(seq) if seq else np.zeros(0, np.int64)
        lens = glob_len[seq]
        poff = np.zeros(len(seq) + 1, dtype=np.int64)
        np.cumsum(lens, out=poff[1:])
        idx = np.repeat(glob_start[seq] - poff[:-1], lens) + np.arange(poff[-1], dtype=np.int64)
        samples_e = cat_samples[idx]
        del idx
        ploss = glob_loss[seq]
        spo = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(nper, out=spo[1:])
        all_samples.append(samples_e)
        all_lengths.append(lengths[samples_e])
        all_poff.append(poff[:-1] + samp_total)
        all_ploss.append(ploss)
        all_sg.append(step_groups[order])
        all_smb.append(np.asarray(mb, dtype=np.int32))
        all_spo.append(spo[:-1] + pack_total)
        all_se.append(np.full(len(order), epoch, dtype=np.int32))
        all_sl.append(np.add.reduceat(ploss, spo[:-1]) if len(order) else np.zeros(0, np.int64))
        pack_total += len(seq)
        samp_total += len(samples_e)
        timer.lap("ordering")
    idx_dtype = np.int32 if N < 2**31 else np.int64
    arrays = {
        "samples": np.concatenate(all_samples).astype(idx_dtype),
        "lengths": np.concatenate(all_lengths).astype(np.int32),
        "pack_offsets": np.append(np.concatenate(all_poff), samp_total).astype(np.int64),
        "pack_loss_tokens": np.concatenate(all_ploss).astype(np.int64),
        "step_pack_offsets": np.append(np.concatenate(all_spo), pack_total).astype(np.int64),
        "step_group": np.concatenate(all_sg).astype(np.int32),
        "step_micro_batches": np.concatenate(all_smb).astype(np.int32),
        "step_epoch": np.concatenate(all_se).astype(np.int32),
        "step_loss_tokens": np.concatenate(all_sl).astype(np.int64),
        "dropped_indices": np.concatenate(d_idx) if d_idx else np.zeros(0, np.int64),
        "dropped_reasons": np.concatenate(d_rsn) if d_rsn else np.zeros(0, np.int8),
        "dropped_epochs": np.concatenate(d_ep) if d_ep else np.zeros(0, np.int32),
    }
    timer.lap("ordering")
    stats["drops"] = drop_summary(lengths, gid, arrays, config)
    stats["stage_seconds"] = dict(timer.t)
    stats["stage_cpu_seconds"] = dict(timer.cpu)
    stats["plan_seconds"] = time.perf_counter() - t_start
    stats["plan_cpu_seconds"] = time.process_time() - c_start
    return Plan(
        config=config,
        arrays=arrays,
        num_samples=N,
        fingerprint=fingerprint,
        lengths_sha256=lengths_digest(lengths),
        stats=stats,
    )
