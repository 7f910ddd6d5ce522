"""Automatic group selection: the paper's Algorithms 1, 3, 4 over a Profiler, and our improvement.

Paper (HBP.md 3.1), over a ``Profiler`` (analytic or measured):

- ``greedy_profile_ckpt(l, sp)`` (Algorithm 3, GreedyProfileCkpt): free memory m1 with
  c_min recomputed layers and m2 with c_max; m_ave = (m2 - m1) / (c_max - c_min) is what one
  recomputed layer saves; c_o = c_max - floor(m2 / m_ave) is the fewest that still fit. We then
  verify c_o with one more profile and step up while it does not fit (the extrapolation is
  exact for a linear memory curve; the first recomputed layer also costs one layer of
  re-materialised activations, which the step-up absorbs).
- ``find_best_sp_ckpt(l)`` (Algorithm 4, FindBestSpCkpt): for every CP degree sp, the fewest
  recomputed layers that fit, then the time per token of (l, sp, ckpt); keep the fastest.
- ``select_groups_paper`` (Algorithm 1): every candidate length profiled at the same tokens per
  GPU on packs drawn from the real data ("hybrid data"); l_best = the fastest per token;
  l_max = the smallest candidate that holds the longest sample, with its strategy sp_max.
  Communication-free subgroups l1 = l_best / sp_best and l2 = l_max / sp_max run with CP 1;
  l2 is merged away when l2 <= l_best. Groups = sorted unique {l1, l_best, l2, l_max}.

Improvement (``select_groups_simulated``): Algorithm 1 picks groups from per-length time per
token on synthetic full packs and never looks at how many samples each group gets, how full
its packs are, or how the steps balance. We instead enumerate group sets (every subset of the
candidate lengths below l_max, each with its best strategy from the same candidate table or
with CP 1 where that fits one GPU, plus l_max with each CP degree that fits), build the real
plan for each on the actual length distribution (a subsample for speed), simulate its epoch
(``simulate.simulate_plan``) and keep the fastest. Search and final evaluation score a set with
the same function (``evaluate_group_set``: same packer, last-step policy and balancer; GPU-hours
per trained token times all tokens, so dropped samples never make a set look cheaper); a set
that leaves a group without any step is never chosen (``GroupSetScore.valid``).
``tools/select_groups.py`` re-scores the paper's set and the search's best sets on the full data
and writes the fastest of that evaluation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from megatron_hbp.costmodel.profiler import Profiler, ProfileResult, profile_packs

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
DEFAULT_CP = (1, 2, 4, 8)


@dataclass(frozen=True)
class Candidate:
    """One row of the candidates table (the paper's Table 19)."""

    pack_length: int
    cp: int
    recompute_layers: int
    peak_memory_gib: float
    time_s: float
    time_per_token_us: float
    tokens_per_gpu: float


@dataclass(frozen=True)
class GroupChoice:
    pack_length: int
    cp: int
    recompute_layers: int


def greedy_profile_ckpt(
    profiler: Profiler,
    packs: list[np.ndarray],
    pack_length: int,
    cp: int,
    c_min: int = 0,
    c_max: int | None = None,
) -> int | None:
    """Algorithm 3: fewest recomputed layers for (pack_length, cp) that fit; None if c_max does not."""
    c_max = profiler.num_layers if c_max is None else c_max
    one = packs[:1]
    r1 = profiler.profile(one, pack_length, cp, c_min)
    if r1.fits:
        return c_min
    r2 = profiler.profile(one, pack_length, cp, c_max)
    if not r2.fits:
        return None
    m1, m2 = r1.free_memory_bytes, r2.free_memory_bytes
    m_ave = (m2 - m1) / (c_max - c_min)
    c = max(c_min, c_max - math.floor(m2 / m_ave))
    while c < c_max and not profiler.profile(one, pack_length, cp, c).fits:
        c += 1
    return c


def find_best_sp_ckpt(
    profiler: Profiler,
    lengths: np.ndarray,
    pack_length: int,
    cp_degrees=DEFAULT_CP,
    *,
    tokens_per_gpu: int,
    world_size: int,
    seed: int = 0,
) -> tuple[list[Candidate], Candidate | None]:
    """Algorithm 4 for one pack length: all feasible (cp, ckpt) rows and the fastest per token.

    Each cp runs ``tokens_per_gpu * cp / pack_length`` packs (at least one) so that every row
    processes the same tokens per GPU."""
    rows = []
    for cp in cp_degrees:
        if cp > world_size or world_size % cp or (cp > 1 and pack_length % (2 * cp)):
            continue
        n = max(1, round(tokens_per_gpu * cp / pack_length))
        packs = profile_packs(lengths, pack_length, n, seed=seed)
        k = greedy_profile_ckpt(profiler, packs, pack_length, cp)
        if k is None:
            continue
        r: ProfileResult = profiler.profile(packs, pack_length, cp, k)
        rows.append(
            Candidate(
                pack_length=pack_length,
                cp=cp,
                recompute_layers=k,
                peak_memory_gib=r.peak_memory_bytes / 2**30,
                time_s=r.time_s,
                time_per_token_us=r.time_per_token_s * 1e6,
                tokens_per_gpu=r.tokens_per_gpu,
            )
        )
    best = min(rows, key=lambda c: c.time_per_token_us) if rows else None
    return rows, best


@dataclass
class Selection:
    """Result of a group selection."""

    groups: list[GroupChoice]
    candidates: list[Candidate]
    best: dict
    """pack_length -> best Candidate (Algorithm 4)."""
    l_best: int
    l_max: int
    notes: list[str]


def select_groups_paper(
    profiler: Profiler,
    lengths: np.ndarray,
    *,
    world_size: int,
    candidate_lengths=DEFAULT_LENGTHS,
    cp_degrees=DEFAULT_CP,
    tokens_per_gpu: int | None = None,
    seed: int = 0,
) -> Selection:
    """Algorithm 1 (see module docstring). ``tokens_per_gpu`` defaults to the largest candidate
    length divided by the largest CP degree (the paper profiles all lengths at equal tokens/GPU)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cands = sorted(int(x) for x in candidate_lengths)
    longest = int(lengths.max())
    if longest > cands[-1]:
        raise ValueError(
            f"the longest sample ({longest} tokens) exceeds every candidate pack length (max {cands[-1]}); "
            "add a larger candidate or truncate the data"
        )
    tpg = tokens_per_gpu or cands[-1] // max(cp_degrees)
    table, best = [], {}
    for length in cands:
        rows, b = find_best_sp_ckpt(
            profiler, lengths, length, cp_degrees, tokens_per_gpu=tpg, world_size=world_size, seed=seed
        )
        table += rows
        if b is not None:
            best[length] = b
    notes = []
    feasible = [length for length in cands if length in best]
    if not feasible:
        raise ValueError("no candidate (pack length, CP) fits in memory even with full recompute")
    l_best = min(feasible, key=lambda length: best[length].time_per_token_us)
    l_max = next(length for length in cands if length >= longest)
    if l_max not in best:
        raise ValueError(
            f"pack length {l_max} (needed by the longest sample) fits no CP degree in {cp_degrees}"
        )
    sp_best, sp_max = best[l_best].cp, best[l_max].cp
    chosen = {l_best: GroupChoice(l_best, sp_best, best[l_best].recompute_layers)}
    chosen[l_max] = GroupChoice(l_max, sp_max, best[l_max].recompute_layers)
    for sub, name in ((l_best // sp_best, "l1 = l_best/sp_best"), (l_max // sp_max, "l2 = l_max/sp_max")):
        if sub in chosen:
            notes.append(f"{name} = {sub} is already a group: merged")
            continue
        if name.startswith("l2") and sub <= l_best:
            notes.append(f"{name} = {sub} <= l_best = {l_best}: merged into l_best")
            continue
        k = greedy_profile_ckpt(profiler, profile_packs(lengths, sub, 1, seed=seed), sub, 1)
        if k is None:
            notes.append(f"{name} = {sub} does not fit one GPU: skipped")
            continue
        chosen[sub] = GroupChoice(sub, 1, k)
        notes.append(f"{name} = {sub}: communication-free CP=1 subgroup")
    groups = [chosen[length] for length in sorted(chosen)]
    return Selection(groups=groups, candidates=table, best=best, l_best=l_best, l_max=l_max, notes=notes)


def _group_sets(selection: Selection, profiler: Profiler, lengths: np.ndarray, seed: int):
    """Candidate group sets for the simulated search (see module docstring)."""
    best = selection.best
    cands = sorted(best)
    l_max = selection.l_max
    cp1 = {}
    for length in cands:
        rows = [c for c in selection.candidates if c.pack_length == length and c.cp == 1]
        if rows:
            cp1[length] = rows[0]
    seen, out = set(), []
    others = [length for length in cands if length < l_max]
    top_rows = [c for c in selection.candidates if c.pack_length == l_max]  # every feasible CP of l_max
    for r in range(len(others) + 1):
        for subset in itertools.combinations(others, r):
            for prefer_cp1 in (False, True):
                for top in top_rows:
                    gs = []
                    for length in subset:
                        c = cp1[length] if prefer_cp1 and length in cp1 else best[length]
                        gs.append(GroupChoice(length, c.cp, c.recompute_layers))
                    gs.append(GroupChoice(l_max, top.cp, top.recompute_layers))
                    key = tuple((g.pack_length, g.cp) for g in gs)
                    if key not in seen:
                        seen.add(key)
                        out.append(gs)
    paper = tuple((g.pack_length, g.cp) for g in selection.groups)
    if paper not in seen:
        out.append(list(selection.groups))
    return out


def plan_config_for(groups: list[GroupChoice], world_size: int, tokens_per_step: int, **plan_kwargs):
    """A ``PlanConfig`` with the given groups and a per-group micro-batch count giving each step
    about ``tokens_per_step`` of capacity (at least one micro-batch)."""
    from megatron_hbp.planner.config import GroupConfig, PlanConfig

    gcs = []
    for g in groups:
        per_mb = world_size // g.cp * g.pack_length
        gcs.append(
            GroupConfig(
                pack_length=g.pack_length,
                cp=g.cp,
                recompute_layers=g.recompute_layers,
                micro_batches=max(1, round(tokens_per_step / per_mb)),
            )
        )
    return PlanConfig(groups=gcs, world_size=world_size, **plan_kwargs)


def simulate_group_set(
    groups: list[GroupChoice], lengths: np.ndarray, cost_model, *, tokens_per_step: int, **plan_kwargs
):
    """Build the plan for ``groups`` on ``lengths`` and simulate its epoch (``SimResult``)."""
    from megatron_hbp.costmodel.simulate import simulate_plan
    from megatron_hbp.planner import build_plan

    cfg = plan_config_for(groups, cost_model.dp_cp_ranks, tokens_per_step, **plan_kwargs)
    plan = build_plan(lengths, None, cfg)
    return simulate_plan(plan, cost_model, name=format_groups(groups, short=True))


@dataclass
class GroupSetScore:
    """One group set planned and simulated on some lengths (``evaluate_group_set``)."""

    groups: list[GroupChoice]
    result: object
    """The ``SimResult`` of its plan."""
    total_tokens: int
    """Tokens of the lengths it was planned on (trained + dropped)."""

    @property
    def gpu_hours(self) -> float:
        """Simulated GPU-hours of the plan as built (dropped samples not trained)."""
        return self.result.gpu_hours

    @property
    def hours(self) -> float:
        """The score: GPU-hours to train every token at this plan's cost per trained token, so a
        set that drops samples (the planner's ``last_step: drop``) does not look cheaper."""
        return self.result.gpu_hours * self.total_tokens / max(self.result.tokens, 1)

    @property
    def group_steps(self) -> list[int]:
        return list(self.result.extra["group_steps"])

    @property
    def empty_groups(self) -> list[GroupChoice]:
        """Groups that get no step at all: listed in the config, never run (their samples dropped)."""
        return [g for g, n in zip(self.groups, self.group_steps) if n == 0]

    @property
    def valid(self) -> bool:
        return not self.empty_groups


def evaluate_group_set(
    groups: list[GroupChoice], lengths: np.ndarray, cost_model, *, tokens_per_step: int, **plan_kwargs
) -> GroupSetScore:
    """The one scoring function of the search and of the final evaluation: the plan for ``groups``
    (same packer, last-step policy and balancer: ``plan_kwargs``) simulated on ``lengths``."""
    lengths = np.asarray(lengths, dtype=np.int64)
    res = simulate_group_set(groups, lengths, cost_model, tokens_per_step=tokens_per_step, **plan_kwargs)
    return GroupSetScore(groups=list(groups), result=res, total_tokens=int(lengths.sum()))


def pick_fastest(scores: list[GroupSetScore], tolerance: float = 0.0) -> GroupSetScore | None:
    """The fastest valid set (no group without steps) by ``hours``; among valid sets within
    ``tolerance`` (relative) of it, the one with the fewest groups. None when no set is valid."""
    ok = [s for s in scores if s.valid]
    if not ok:
        return None
    fastest = min(s.hours for s in ok)
    near = [s for s in ok if s.hours <= fastest * (1 + tolerance)]
    return min(near, key=lambda s: (len(s.groups), s.hours))


def select_groups_simulated(
    selection: Selection,
    profiler: Profiler,
    lengths: np.ndarray,
    cost_model,
    *,
    tokens_per_step: int,
    sample: int | None = 200_000,
    tolerance: float = 0.01,
    seed: int = 0,
    progress: bool = False,
    **plan_kwargs,
) -> tuple[list[GroupChoice] | None, list[GroupSetScore]]:
    """Our improvement: every candidate group set scored by ``evaluate_group_set`` on (a subsample
    of) the real lengths; the choice is ``pick_fastest(scores, tolerance)`` (None if every set
    leaves a group without steps). Returns (chosen groups, every set's score, fastest first).
    ``tools/select_groups.py`` re-scores the best sets on the full data with the same function and
    writes the fastest of that evaluation."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if sample is not None and len(lengths) > sample:
        rng = np.random.default_rng(seed)
        sub = lengths[rng.choice(len(lengths), sample, replace=False)]
    else:
        sub = lengths
    sets = _group_sets(selection, profiler, lengths, seed)
    if progress:
        from tqdm import tqdm

        sets = tqdm(sets, desc="simulating group sets", unit="set")
    scored = [
        evaluate_group_set(gs, sub, cost_model, tokens_per_step=tokens_per_step, seed=seed, **plan_kwargs)
        for gs in sets
    ]
    scored.sort(key=lambda t: t.hours)
    chosen = pick_fastest(scored, tolerance)
    return (chosen.groups if chosen is not None else None), scored


def format_candidates(selection: Selection) -> str:
    """Markdown table of the candidates (paper Table 19 style); '*' marks each length's best."""
    lines = [
        "| pack length | CP | recompute layers | peak memory GiB | time s | us/token/GPU | best |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in selection.candidates:
        star = "*" if selection.best.get(c.pack_length) == c else ""
        lines.append(
            f"| {c.pack_length // 1024}K | {c.cp} | {c.recompute_layers} | {c.peak_memory_gib:.1f} | "
            f"{c.time_s:.2f} | {c.time_per_token_us:.2f} | {star} |"
        )
    return "\n".join(lines)


def format_groups(groups: list[GroupChoice], short: bool = False) -> str:
    if short:
        return " + ".join(f"{g.pack_length // 1024}K/CP{g.cp}" for g in groups)
    return ", ".join(f"{g.pack_length // 1024}K/CP{g.cp}/ckpt{g.recompute_layers}" for g in groups)
