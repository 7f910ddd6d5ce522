"""Cluster simulator: epoch time of several packing/scheduling strategies on the same samples.

For a plan (``megatron_hbp.planner.build_plan``) every micro-batch (pack) gets a time from the
cost model (``CostModel.microbatch_breakdown``: slowest CP rank's compute + exposed CP
communication + fixed overhead); a replica's time is the sum over its micro-batches; a step
takes the slowest replica's time plus the exposed data-parallel gradient reduction plus the
optimizer update; the epoch is the sum over steps, in GPU-hours = seconds * GPUs / 3600.
Everything is vectorised over packs (a 1M-sample plan simulates in about a second).

The Megatron-Core dynamic-CP strategy does not use the planner: the shuffled samples are cut
into global batches of the same token budget as the plans' steps, each batch is scheduled by
``dynamic_cp.schedule_step`` (Megatron's ``BalancedCPScheduler``), every sub-sample is a
micro-batch of its own with its own CP size, groups run one after another (barrier), and
a group lasts as long as its busiest GPU.

Megatron-LM's current sequence-packing scheduler (``simulate_dynamic_cp_upstream``, a port of
``DpBalancedScheduler`` at commit d98e8a64, ``dynamic_cp_upstream.py``) gets the same global
batches; its schedule (next-fit packs in arrival order, static CP) is written as a plan and
simulated by ``simulate_plan``.

The exposed DP reduction of a step is ``max(0, reduction - mean micro-batch compute)`` (overlap
with one micro-batch; the mean over the step's micro-batches stands for the one that hides it).

Metrics (HBP.md section 2) for plans come from ``megatron_hbp.planner.metrics``. For dynamic
CP a "replica" is one GPU and its share of a sample with CP size c is l/c tokens and l^2/c
attention (the scheduler's own workload measure); CR = tokens of samples run with c > 1 / all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from megatron_hbp.costmodel.dynamic_cp import schedule_step
from megatron_hbp.costmodel.model import CostModel
from megatron_hbp.planner.config import GroupConfig, PlanConfig
from megatron_hbp.planner.packing import cp_padded
from megatron_hbp.planner.workload import zigzag_doc_pairs


@dataclass
class SimResult:
    """Simulated epoch of one strategy."""

    name: str
    num_gpus: int
    step_times: np.ndarray
    """Seconds of each step [S]."""
    compute_s: float
    """Sum over steps of the slowest replica's compute seconds."""
    cp_comm_s: float
    """Sum over steps of the slowest replica's exposed CP communication seconds."""
    dp_comm_s: float
    """Sum over steps of exposed DP gradient reduction + optimizer seconds."""
    abr: float
    dbr: float
    cr: float
    tokens: int
    """Real tokens trained in the epoch."""
    num_dropped: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.step_times)

    @property
    def epoch_s(self) -> float:
        return float(self.step_times.sum())

    @property
    def gpu_hours(self) -> float:
        return self.epoch_s * self.num_gpus / 3600.0

    @property
    def tokens_per_gpu_s(self) -> float:
        return self.tokens / (self.epoch_s * self.num_gpus) if self.epoch_s > 0 else 0.0


def simulate_plan(plan, cost_model: CostModel, name: str = "plan") -> SimResult:
    """Simulate every step of ``plan`` (a ``megatron_hbp.planner`` Plan) on ``cost_model``'s cluster.

    The plan's world_size must equal the cost model's DP x CP ranks (GPUs / TP)."""
    from megatron_hbp.planner.metrics import compute_metrics

    if plan.world_size != cost_model.dp_cp_ranks:
        raise ValueError(
            f"plan world_size={plan.world_size} but the cluster has {cost_model.dp_cp_ranks} DP x CP ranks "
            f"({cost_model.num_gpus} GPUs / TP {cost_model.setup.tensor_parallel}); plan for that world size"
        )
    a = plan.arrays
    wl = plan.workload  # each pack's padded tokens and per-CP-rank pairs, derived once
    spo = a["step_pack_offsets"].astype(np.int64)
    sg = a["step_group"].astype(np.int64)
    S, P = len(sg), wl.num_packs
    groups = plan.groups
    cps = np.array([g.cp for g in groups], dtype=np.int64)
    step_of_pack = wl.pack_step
    g_of_pack = sg[step_of_pack]
    t_comp = np.zeros(P)
    t_comm = np.zeros(P)
    for gi, g in enumerate(groups):
        sel = np.nonzero(g_of_pack == gi)[0]
        if not len(sel):
            continue
        pairs = wl.entry_zigzag_pairs[(wl.entry_offsets[sel][:, None] + np.arange(g.cp)[None, :]).reshape(-1)]
        c, m = cost_model.microbatch_breakdown(
            wl.pack_padded_tokens[sel], pairs.reshape(-1, g.cp), g.cp, g.recompute_layers
        )
        t_comp[sel], t_comm[sel] = c + cost_model.efficiency.microbatch_overhead_s, m
    n_rep = plan.world_size // cps[sg]
    rep_base = np.concatenate([[0], np.cumsum(n_rep)])
    rep_id = rep_base[step_of_pack] + wl.pack_replica
    R = int(rep_base[-1])
    rep_comp = np.bincount(rep_id, t_comp, minlength=R)
    rep_comm = np.bincount(rep_id, t_comm, minlength=R)
    rep_time = rep_comp + rep_comm
    slow = _argmax_segments(rep_time, rep_base)
    step_compute, step_comm = rep_comp[slow], rep_comm[slow]
    # the same work spread evenly over each step's replicas (what a perfect balancer would reach)
    balanced = float((np.add.reduceat(rep_time, rep_base[:-1]) / n_rep).sum()) if R else 0.0
    mb_mean = np.bincount(step_of_pack, t_comp, minlength=S) / np.maximum(np.diff(spo), 1)
    dp = np.array([cost_model.dp_exposed_time(x) for x in mb_mean]) + cost_model.optimizer_time()
    step_times = step_compute + step_comm + dp
    met = compute_metrics(plan, cp_balance=False)
    return SimResult(
        name=name,
        num_gpus=cost_model.num_gpus,
        step_times=step_times,
        compute_s=float(step_compute.sum()),
        cp_comm_s=float(step_comm.sum()),
        dp_comm_s=float(dp.sum()),
        abr=met["ABR"],
        dbr=met["DBR"],
        cr=met["CR"],
        tokens=int(met["total_tokens"]),
        num_dropped=int(met["num_dropped"]),
        extra={
            "groups": [(g.pack_length, g.cp, g.recompute_layers) for g in groups],
            "group_steps": [int(x["num_steps"]) for x in met["per_group"]],
            "PR": met["PR"],
            "balanced_s": balanced,
        },
    )


def _argmax_segments(values: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index of the maximum of each segment ``values[bounds[i]:bounds[i+1]]`` (non-empty)."""
    seg = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    order = np.lexsort((-values, seg))  # by segment, then decreasing value
    return order[bounds[:-1]]


# ---------------------------------------------------------------------- dynamic CP
def global_batches(lengths: np.ndarray, tokens_per_step: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle sample indices and cut them into consecutive batches of ~``tokens_per_step`` tokens
    (a batch closes before the sample that would exceed the budget; the last may be short)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(lengths))
    csum = np.concatenate([[0], np.cumsum(lengths[order])])
    out, start, n = [], 0, len(order)
    while start < n:
        end = int(np.searchsorted(csum, csum[start] + tokens_per_step, "right")) - 1
        end = max(end, start + 1)  # a sample longer than the budget is a batch of its own
        out.append(order[start:end])
        start = end
    return out


def simulate_dynamic_cp(
    lengths: np.ndarray,
    cost_model: CostModel,
    *,
    tokens_per_step: int,
    max_seqlen_per_rank: int,
    recompute_layers: int | None = None,
    pack_subsamples: bool = False,
    linear_coef: float = 0.0,
    seed: int = 0,
    name: str = "dynamic-CP (Megatron)",
    progress: bool = False,
) -> SimResult:
    """Megatron-Core hybrid context parallel over the DP x CP ranks of ``cost_model``.

    ``recompute_layers``: one global setting (Megatron has no per-sample recompute); default the
    fewest layers that fit ``max_seqlen_per_rank`` tokens per GPU at the largest CP size.
    ``pack_subsamples``: a what-if, not Megatron's behaviour: the CP=1 sub-samples a GPU runs in
    one group are packed into a single micro-batch instead of one micro-batch each.
    ``linear_coef``: a what-if workload estimate (linear_coef l + l^2) / cp instead of l^2 / cp."""
    W = cost_model.dp_cp_ranks
    lengths = np.asarray(lengths, dtype=np.int64)
    if recompute_layers is None:
        max_cp = 1
        while max_cp < W and max_cp * max_seqlen_per_rank < lengths.max():
            max_cp *= 2
        recompute_layers = cost_model.min_recompute_layers(max_seqlen_per_rank * max_cp, max_cp)
        if recompute_layers is None:
            raise ValueError(
                f"dynamic CP: {max_seqlen_per_rank} tokens per GPU do not fit even with full recompute"
            )
    k = int(recompute_layers)
    batches = global_batches(lengths, tokens_per_step, seed)
    it = batches
    if progress:
        from tqdm import tqdm

        it = tqdm(batches, desc="dynamic-CP schedule", unit="step")
    # One record per (sub-sample, GPU that runs it): step, group (global id), gpu, length, cp.
    rec_step, rec_group, rec_gpu, rec_len, rec_cp = [], [], [], [], []
    group_step = []
    for si, batch in enumerate(it):
        seqlens = lengths[batch]
        for grp in schedule_step(seqlens, max_seqlen_per_rank, W, linear_coef):
            gid = len(group_step)
            group_step.append(si)
            for r, items in enumerate(grp):
                for sid, cp in items:
                    rec_step.append(si)
                    rec_group.append(gid)
                    rec_gpu.append(r)
                    rec_len.append(int(seqlens[sid]))
                    rec_cp.append(cp)
    S, G = len(batches), len(group_step)
    step_arr = np.array(rec_step, dtype=np.int64)
    slot = np.array(rec_group, dtype=np.int64) * W + np.array(rec_gpu, dtype=np.int64)
    length = np.array(rec_len, dtype=np.int64)
    cp_arr = np.array(rec_cp, dtype=np.int64)
    comp = np.zeros(len(length))
    comm = np.zeros(len(length))
    overhead = cost_model.efficiency.microbatch_overhead_s
    packed_slots = None
    for c in np.unique(cp_arr):
        sel = np.nonzero(cp_arr == c)[0]
        if pack_subsamples and c == 1:
            # one micro-batch per (group, GPU): sum tokens and pairs of its CP=1 sub-samples
            keys, inv = np.unique(slot[sel], return_inverse=True)
            tok = np.bincount(inv, length[sel].astype(np.float64))
            pairs = np.bincount(inv, (length[sel] * (length[sel] + 1) // 2).astype(np.float64))
            pc, pm = cost_model.microbatch_breakdown(tok, pairs[:, None], 1, k)
            packed_slots = (keys, pc + overhead, pm)
            continue
        ul, inv = np.unique(length[sel], return_inverse=True)
        uc, um = cost_model.microbatch_breakdown(
            cp_padded(ul, int(c)), zigzag_doc_pairs(ul, int(c)), int(c), k
        )
        comp[sel] = uc[inv] + overhead
        comm[sel] = um[inv]
    slot_comp = np.bincount(slot, comp, minlength=G * W)
    slot_comm = np.bincount(slot, comm, minlength=G * W)
    if packed_slots is not None:
        keys, pc, pm = packed_slots
        slot_comp[keys] += pc
        slot_comm[keys] += pm
    slot_time = (slot_comp + slot_comm).reshape(G, W)
    slow = np.argmax(slot_time, axis=1)
    balanced = float(slot_time.mean(axis=1).sum())  # each group's work spread evenly over its GPUs
    g_comp = slot_comp.reshape(G, W)[np.arange(G), slow]
    g_comm = slot_comm.reshape(G, W)[np.arange(G), slow]
    gs = np.array(group_step, dtype=np.int64)
    step_comp = np.bincount(gs, g_comp, minlength=S)
    step_comm = np.bincount(gs, g_comm, minlength=S)
    # mean compute of the step's micro-batches (the one that hides the DP reduction): every
    # unpacked (sub-sample, GPU) record is a micro-batch; with pack_subsamples each GPU's CP-1
    # sub-samples of a group are ONE micro-batch with the packed compute (their records carry 0)
    own = np.ones(len(length), dtype=bool) if packed_slots is None else cp_arr > 1
    n_mb = np.bincount(step_arr[own], minlength=S).astype(np.float64)
    mb_sum = np.bincount(step_arr[own], comp[own], minlength=S).astype(np.float64)
    if packed_slots is not None:
        keys, pc, _ = packed_slots
        slot_step = gs[keys // W]
        n_mb += np.bincount(slot_step, minlength=S)
        mb_sum += np.bincount(slot_step, pc, minlength=S)
    mb_mean = mb_sum / np.maximum(n_mb, 1)
    dp = np.array([cost_model.dp_exposed_time(x) for x in mb_mean]) + cost_model.optimizer_time()
    # balance metrics per step over GPUs: a sample's share on each of its cp GPUs is l/cp, l^2/cp
    sg = step_arr * W + np.array(rec_gpu, dtype=np.int64)
    tok = np.bincount(sg, length / cp_arr, minlength=S * W).reshape(S, W)
    att = np.bincount(sg, length.astype(np.float64) ** 2 / cp_arr, minlength=S * W).reshape(S, W)

    def ratio(x):
        mx = x.max(axis=1)
        return np.where(mx > 0, 1 - x.mean(axis=1) / np.where(mx > 0, mx, 1), 0.0)

    total_tokens = int(lengths.sum())
    cp_tokens = float((length / cp_arr)[cp_arr > 1].sum())
    return SimResult(
        name=name,
        num_gpus=cost_model.num_gpus,
        step_times=step_comp + step_comm + dp,
        compute_s=float(step_comp.sum()),
        cp_comm_s=float(step_comm.sum()),
        dp_comm_s=float(dp.sum()),
        abr=float(ratio(att).mean()),
        dbr=float(ratio(tok).mean()),
        cr=cp_tokens / total_tokens,
        tokens=total_tokens,
        extra={
            "max_seqlen_per_rank": max_seqlen_per_rank,
            "recompute_layers": k,
            "linear_coef": linear_coef,
            "groups_per_step": G / max(S, 1),
            "micro_batches_per_gpu_step": float(n_mb.sum()) / max(S * W, 1),
            "balanced_s": balanced,
        },
    )


def _fewest_recompute(cost_model: CostModel, max_seqlen_per_rank: int, cp: int, what: str) -> int:
    k = cost_model.min_recompute_layers(max_seqlen_per_rank * cp, cp)
    if k is None:
        raise ValueError(
            f"{what}: {max_seqlen_per_rank} tokens per GPU at CP {cp} do not fit even with full recompute"
        )
    return k


def simulate_dynamic_cp_upstream(
    lengths: np.ndarray,
    cost_model: CostModel,
    *,
    tokens_per_step: int,
    max_seqlen_per_rank: int,
    cp: int | None = None,
    recompute_layers: int | None = None,
    seed: int = 0,
    name: str = "Megatron-LM packing scheduler",
) -> SimResult:
    """Megatron-LM's current sequence-packing scheduler (``dynamic_cp_upstream.DpBalancedScheduler``)
    on the DP x CP ranks of ``cost_model``.

    The same shuffled global batches as ``simulate_dynamic_cp`` (``global_batches``); each is
    scheduled by upstream's next-fit in arrival order on the CP-padded lengths with a cap of
    ``max_seqlen_per_rank * cp`` tokens per pack, the pack count aligned to a multiple of the DP
    size, micro-batch i of DP replica r = pack ``i * dp + r``, CP size ``cp`` for every pack
    (upstream's static ``context_parallel_size``; default: the smallest power of two whose cap
    holds the longest CP-padded sample). The schedule is then written as a plan (one group of
    pack length = the cap, a varying number of micro-batches per step) and simulated by
    ``simulate_plan``, so its times and metrics are defined exactly as for the HBP rows. A global
    batch upstream cannot schedule (its alignment assertion; only a short last batch can hit it) is
    counted in ``num_dropped``. ``recompute_layers``: one global setting, default the fewest that
    fit ``max_seqlen_per_rank`` tokens per GPU at ``cp``."""
    from megatron_hbp.costmodel.dynamic_cp_upstream import schedule_step_upstream
    from megatron_hbp.planner.plan import ARRAY_KEYS, Plan

    W = cost_model.dp_cp_ranks
    lengths = np.asarray(lengths, dtype=np.int64)
    if cp is None:
        cp = 1
        while cp < W and int(cp_padded(lengths.max(keepdims=True), cp)[0]) > max_seqlen_per_rank * cp:
            cp *= 2
    if W % cp:
        raise ValueError(f"upstream packing scheduler: CP {cp} does not divide the {W} DP x CP ranks")
    cap = max_seqlen_per_rank * cp
    padded = cp_padded(lengths, cp)
    if padded.max() > cap:
        raise ValueError(
            f"upstream packing scheduler: a sample of {int(lengths.max())} tokens (CP-padded "
            f"{int(padded.max())}) exceeds max_seqlen_per_rank x CP = {cap}; upstream would run it as an "
            "over-long pack: raise max_seqlen_per_rank or the CP size"
        )
    k = (
        recompute_layers
        if recompute_layers is not None
        else _fewest_recompute(cost_model, max_seqlen_per_rank, cp, "upstream packing scheduler")
    )
    dp = W // cp
    samples, poff, spo, smb = [], [0], [0], []
    n_dropped, dropped_tokens = 0, 0
    for batch in global_batches(lengths, tokens_per_step, seed):
        try:
            mbs = schedule_step_upstream(padded[batch], max_seqlen_per_rank, cp, dp)
        except ValueError:
            n_dropped += len(batch)
            dropped_tokens += int(lengths[batch].sum())
            continue
        for r in range(dp):  # plans list packs replica-major: replica r, micro-batch i
            for mb in mbs:
                samples.extend(batch[mb[r]].tolist())
                poff.append(len(samples))
        spo.append(len(poff) - 1)
        smb.append(len(mbs))
    samples = np.array(samples, dtype=np.int64)
    plen = lengths[samples].astype(np.int32)
    poff = np.array(poff, dtype=np.int64)
    S = len(smb)
    arrays = {
        "samples": samples,
        "lengths": plen,
        "pack_offsets": poff,
        "pack_loss_tokens": np.add.reduceat(plen.astype(np.int64), poff[:-1]) if len(plen) else poff[:0],
        "step_pack_offsets": np.array(spo, dtype=np.int64),
        "step_group": np.zeros(S, dtype=np.int32),
        "step_micro_batches": np.array(smb, dtype=np.int32),
        "step_epoch": np.zeros(S, dtype=np.int32),
        "step_loss_tokens": np.zeros(S, dtype=np.int64),
        "dropped_indices": np.zeros(0, dtype=np.int64),
        "dropped_reasons": np.zeros(0, dtype=np.int8),
        "dropped_epochs": np.zeros(0, dtype=np.int32),
    }
    assert set(arrays) == set(ARRAY_KEYS)
    cfg = PlanConfig(
        groups=[GroupConfig(pack_length=cap, cp=cp, recompute_layers=k)],
        world_size=W,
        micro_batches_per_step=1,
        packer="isf",
        balance="none",
    )
    plan = Plan(config=cfg, arrays=arrays, num_samples=len(lengths), fingerprint=None, lengths_sha256="")
    res = simulate_plan(plan, cost_model, name=name)
    res.num_dropped = n_dropped
    res.extra.update(
        max_seqlen_per_rank=max_seqlen_per_rank,
        cp=cp,
        recompute_layers=k,
        dropped_tokens=dropped_tokens,
        micro_batches_per_step=float(np.mean(smb)) if smb else 0.0,
    )
    return res


# ---------------------------------------------------------------------- strategies
@dataclass(frozen=True, kw_only=True)
class Strategy:
    """One row of the comparison: a plan config, Megatron's hybrid (dynamic) CP, or Megatron-LM's
    sequence-packing scheduler (``upstream_packing``)."""

    name: str
    key: str = ""
    """Short name used by ``tools/simulate.py --strategies``."""
    plan: PlanConfig | None = None
    """Plan config for planner strategies (None for dynamic CP)."""
    max_seqlen_per_rank: int | None = None
    """Dynamic CP only: Megatron's ``max_seqlen_per_dp_cp_rank``."""
    recompute_layers: int | None = None
    """Dynamic CP only: global recompute setting (None: fewest that fit)."""
    pack_subsamples: bool = False
    """Dynamic CP only: what-if that packs each GPU's CP=1 sub-samples of a group into one micro-batch."""
    linear_coef: float = 0.0
    """Dynamic CP only: what-if workload (linear_coef l + l^2) / cp instead of Megatron's l^2 / cp."""
    upstream_packing: bool = False
    """Megatron-LM's ``DpBalancedScheduler`` (``simulate_dynamic_cp_upstream``) instead of hybrid CP."""
    cp: int | None = None
    """``upstream_packing`` only: the static CP size (None: the smallest that holds the longest sample)."""


def default_strategies(
    cost_model: CostModel,
    *,
    tokens_per_gpu: int = 16384,
    micro_batches: int = 1,
    max_length: int = 131072,
    hbp_groups: list[tuple[int, int]] | None = None,
    upstream_cp: int | None = None,
    seed: int = 0,
) -> list[Strategy]:
    """The issue's comparison: ISF (one max_length group, CP = max_length / tokens_per_gpu), HBP
    groups without balancing, HBP (paper: attention sort), HBP with the planner's better packer and
    balancer (best-fit decreasing + LPT on a linear + attention cost), and Megatron's dynamic CP.

    Every strategy runs ``tokens_per_gpu`` tokens per GPU per micro-batch and ``micro_batches``
    micro-batches per step, so all steps have the same token capacity. Recompute layers per group
    are the fewest that fit (``CostModel.min_recompute_layers``). Megatron-LM's packing scheduler
    runs with a static CP of ``upstream_cp`` (default ``max_length / tokens_per_gpu``) and
    ``max_length / upstream_cp`` tokens per GPU (its packs hold ``max_length`` tokens either way)."""
    W = cost_model.dp_cp_ranks
    cp_max = max_length // tokens_per_gpu
    if hbp_groups is None:
        hbp_groups = [(tokens_per_gpu, 1), (max_length, cp_max)]

    def group(length, cp):
        k = cost_model.min_recompute_layers(length, cp)
        if k is None:
            raise ValueError(f"group {length}/CP{cp} does not fit in memory even with full recompute")
        return GroupConfig(pack_length=length, cp=cp, recompute_layers=k)

    isf = [group(max_length, cp_max)]
    hbp = [group(length, cp) for length, cp in hbp_groups]
    coef = cost_model.balance_linear_coef(hbp[0].recompute_layers)

    def cfg(groups, **kw):
        return PlanConfig(groups=groups, world_size=W, micro_batches_per_step=micro_batches, seed=seed, **kw)

    return [
        Strategy(
            name=f"ISF {max_length // 1024}K/CP{cp_max}",
            key="isf",
            plan=cfg(isf, packer="isf", greedy_fill=False, balance="none"),
        ),
        Strategy(
            name="HBP groups (no balance)",
            key="hbp_groups",
            plan=cfg(hbp, packer="isf", greedy_fill=True, balance="none"),
        ),
        Strategy(
            name="HBP (paper: sort)",
            key="hbp",
            plan=cfg(hbp, packer="isf", greedy_fill=True, balance="sort"),
        ),
        Strategy(
            name="HBP + BFD + LPT (ours)",
            key="hbp_ours",
            plan=cfg(hbp, packer="bfd", greedy_fill=True, balance="lpt", cost_linear_coef=float(coef)),
        ),
        Strategy(
            name="Megatron hybrid CP (BalancedCPScheduler)",
            key="dynamic_cp",
            max_seqlen_per_rank=tokens_per_gpu,
        ),
        Strategy(
            name="Megatron-LM packing scheduler (DpBalanced)",
            key="dynamic_cp_upstream",
            max_seqlen_per_rank=max_length // (upstream_cp or cp_max),
            cp=upstream_cp or cp_max,
            upstream_packing=True,
        ),
        Strategy(
            name="hybrid CP, packed sub-samples (what-if)",
            key="dynamic_cp_packed",
            max_seqlen_per_rank=tokens_per_gpu,
            pack_subsamples=True,
        ),
        Strategy(
            name="hybrid CP, packed + linear+l^2 cost (what-if)",
            key="dynamic_cp_packed_linear",
            max_seqlen_per_rank=tokens_per_gpu,
            pack_subsamples=True,
            linear_coef=float(coef),
        ),
    ]


def run_strategies(
    lengths: np.ndarray,
    cost_model: CostModel,
    strategies: list[Strategy],
    *,
    loss_tokens: np.ndarray | None = None,
    tokens_per_step: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[SimResult]:
    """Build each plan and simulate it (dynamic CP: schedule and simulate) on the same samples."""
    from megatron_hbp.planner import build_plan

    out = []
    for s in strategies:
        t0 = time.perf_counter()
        if s.plan is not None:
            plan = build_plan(lengths, loss_tokens, s.plan)
            res = simulate_plan(plan, cost_model, name=s.name)
            if tokens_per_step is None:
                g = s.plan.groups[0]
                tokens_per_step = s.plan.world_size // g.cp * g.pack_length * s.plan.micro_batches(0)
        else:
            if tokens_per_step is None:
                raise ValueError("dynamic CP needs tokens_per_step (or a plan strategy before it)")
        if s.plan is None and s.upstream_packing:
            res = simulate_dynamic_cp_upstream(
                lengths,
                cost_model,
                tokens_per_step=tokens_per_step,
                max_seqlen_per_rank=s.max_seqlen_per_rank,
                cp=s.cp,
                recompute_layers=s.recompute_layers,
                seed=seed,
                name=s.name,
            )
        elif s.plan is None:
            res = simulate_dynamic_cp(
                lengths,
                cost_model,
                tokens_per_step=tokens_per_step,
                max_seqlen_per_rank=s.max_seqlen_per_rank,
                recompute_layers=s.recompute_layers,
                pack_subsamples=s.pack_subsamples,
                linear_coef=s.linear_coef,
                seed=seed,
                name=s.name,
                progress=progress,
            )
        res.extra["wall_s"] = time.perf_counter() - t0
        out.append(res)
    return out


def format_table(results: list[SimResult], baseline: int = 0) -> str:
    """Markdown table: ABR, DBR, CR, steps, time split (wall-clock hours of one GPU: compute and
    exposed CP communication of the slowest replica or GPU, exposed DP reduction + optimizer, and the
    part of the first two a perfect balancer would remove: "imbalance"), epoch GPU-hours, samples
    dropped and the
    speed-up against ``results[baseline]`` (same data, same profile), measured per trained token:
    (baseline GPU-hours / its tokens) / (row GPU-hours / row tokens), so a row that drops samples
    (e.g. the planner's ``last_step: drop``) does not look faster for training less."""

    def per_token(r):
        return r.gpu_hours / r.tokens if r.tokens and r.gpu_hours > 0 else None

    base = per_token(results[baseline])
    lines = [
        "| strategy | ABR | DBR | CR | steps | compute h | CP comm h | DP+opt h | imbalance h | GPU-hours "
        f"| dropped | speed-up vs {results[baseline].name.split(' ')[0]} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        imb = r.compute_s + r.cp_comm_s - r.extra.get("balanced_s", r.compute_s + r.cp_comm_s)
        lines.append(
            f"| {r.name} | {r.abr:.3f} | {r.dbr:.3f} | {r.cr:.3f} | {r.num_steps} | {r.compute_s / 3600:.2f} | "
            f"{r.cp_comm_s / 3600:.3f} | {r.dp_comm_s / 3600:.3f} | {imb / 3600:.3f} | {r.gpu_hours:.1f} | "
            f"{r.num_dropped} | "
            + (f"{base / per_token(r):.2f}x |" if base and per_token(r) else "n/a (no token trained) |")
        )
    return "\n".join(lines)
