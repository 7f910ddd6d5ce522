"""Profilers (time and peak memory of a (pack length, CP, recompute) setting) and calibration.

``Profiler.profile(packs, pack_length, cp, recompute_layers)`` runs (or models) one CP group
processing ``packs`` one after another, each pack one micro-batch, and returns the seconds and
the peak memory per GPU. Two implementations:

- ``AnalyticProfiler``: the cost model (``megatron_hbp.costmodel.model``), no GPU.
- ``megatron_hbp.mcore.profiler.MeasuredProfiler`` (not here: it imports torch and Megatron,
  which only ``megatron_hbp.mcore`` may): real training iterations of the trainer's model on
  the local GPU, optimizer and DDP buffers included in the peak memory.

``calibrate(cost_model, points)`` fits the efficiency factors to measured points by linear
least squares on the compute-bound form of the model
``time = dense / dense_mfu + attention / attention_mfu + comm / link_eff + n_mb * overhead``
(unknowns: the four reciprocals / the overhead), and reports the relative fit error.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np

from megatron_hbp.costmodel.model import CostModel, Efficiency
from megatron_hbp.planner.packing import cp_padded
from megatron_hbp.planner.workload import zigzag_attention_pairs


@dataclass(frozen=True)
class ProfileResult:
    """Outcome of profiling one setting on one CP group."""

    pack_length: int
    cp: int
    recompute_layers: int
    num_packs: int
    tokens_per_gpu: float
    """Tokens each GPU processed (sum of pack tokens / cp)."""
    time_s: float
    """Seconds to run all packs (one micro-batch each) forward + backward."""
    peak_memory_bytes: float
    memory_budget_bytes: float

    @property
    def free_memory_bytes(self) -> float:
        """Budget minus peak (negative: does not fit)."""
        return self.memory_budget_bytes - self.peak_memory_bytes

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.memory_budget_bytes

    @property
    def time_per_token_s(self) -> float:
        """Seconds per token per GPU (lower is better); ``inf`` when nothing was processed."""
        return self.time_s / self.tokens_per_gpu if self.tokens_per_gpu > 0 else math.inf


class Profiler(ABC):
    """Measures or models a CP group running packs of one length."""

    num_layers: int
    """Transformer layers of the model (upper bound of recompute_layers)."""
    memory_budget_bytes: float
    """Memory one GPU may use."""

    @abstractmethod
    def profile(
        self, packs: list[np.ndarray], pack_length: int, cp: int, recompute_layers: int
    ) -> ProfileResult:
        """Run (or model) ``packs`` (each an int array of document lengths, sum <= pack_length)."""


def _pack_offsets(packs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lens = [np.asarray(p, dtype=np.int64) for p in packs]
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([x.size for x in lens])
    flat = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    return flat, offsets


class AnalyticProfiler(Profiler):
    """The cost model as a profiler (no GPU)."""

    def __init__(self, cost_model: CostModel, memory_budget_bytes: float | None = None):
        self.cost_model = cost_model
        self.num_layers = cost_model.model.num_layers
        self.memory_budget_bytes = (
            cost_model.hardware.memory_bytes if memory_budget_bytes is None else float(memory_budget_bytes)
        )

    def profile(self, packs, pack_length, cp, recompute_layers):
        flat, offsets = _pack_offsets(packs)
        pad = cp_padded(flat, cp)
        pack_tokens = np.add.reduceat(pad, offsets[:-1]) if flat.size else np.zeros(len(packs))
        pack_tokens = np.where(np.diff(offsets) > 0, pack_tokens, 0)
        pairs = zigzag_attention_pairs(flat, offsets, cp)
        times = self.cost_model.microbatch_time(pack_tokens, pairs, cp, recompute_layers)
        mem = self.cost_model.memory(pack_length, cp, recompute_layers).total
        return ProfileResult(
            pack_length=int(pack_length),
            cp=int(cp),
            recompute_layers=int(recompute_layers),
            num_packs=len(packs),
            tokens_per_gpu=float(pack_tokens.sum()) / cp,
            time_s=float(times.sum()),
            peak_memory_bytes=float(mem),
            memory_budget_bytes=self.memory_budget_bytes,
        )


# ---------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibrationPoint:
    """One measured setting: the packs it ran and the measured seconds."""

    packs: list
    pack_length: int
    cp: int
    recompute_layers: int
    time_s: float


@dataclass(frozen=True)
class CalibrationReport:
    efficiency: Efficiency
    predicted_s: np.ndarray
    measured_s: np.ndarray

    @property
    def relative_errors(self) -> np.ndarray:
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def rms_relative_error(self) -> float:
        return float(np.sqrt(np.mean(self.relative_errors**2)))

    @property
    def max_relative_error(self) -> float:
        return float(np.max(np.abs(self.relative_errors)))


def _features(cost_model: CostModel, point: CalibrationPoint) -> np.ndarray:
    flat, offsets = _pack_offsets(point.packs)
    pad = cp_padded(flat, point.cp)
    pack_tokens = np.add.reduceat(pad, offsets[:-1]) if flat.size else np.zeros(len(point.packs))
    pack_tokens = np.where(np.diff(offsets) > 0, pack_tokens, 0)
    pairs = zigzag_attention_pairs(flat, offsets, point.cp)
    comp = cost_model.time_components(pack_tokens, pairs, point.cp, point.recompute_layers)
    return np.array([comp.dense.sum(), comp.attention.sum(), comp.comm.sum(), len(point.packs)])


def calibrate(
    cost_model: CostModel,
    points: list[CalibrationPoint],
    *,
    fit_overhead: bool = True,
    min_share: float = 0.05,
) -> CalibrationReport:
    """Least-squares fit of ``Efficiency`` to measured points; returns the fit and its errors.

    Rows are weighted by 1/measured so the fit minimises relative error. Coefficients that the
    points cannot determine (e.g. no CP point -> no comm column) keep the model's current value;
    so do the compute/communication terms that are under ``min_share`` of the measured time in
    every point, and coefficients the unconstrained fit makes non-positive (then the others are
    refit).
    Efficiencies are clipped into (0, 1].
    """
    if not points:
        raise ValueError("calibrate: give at least one measured point")
    X = np.stack([_features(cost_model, p) for p in points])
    y = np.array([p.time_s for p in points], dtype=np.float64)
    if np.any(y <= 0):
        raise ValueError("calibrate: measured times must be positive")
    e = cost_model.efficiency
    link_eff = e.nvlink_efficiency
    current = np.array([1 / e.dense_mfu, 1 / e.attention_mfu, 1 / link_eff, e.microbatch_overhead_s])
    free = np.abs(X).max(axis=0) > 0  # a column of zeros (e.g. no CP point) cannot be fitted
    if not fit_overhead:
        free[3] = False
    # A term that is a small share of every measured time (at the model's current efficiency)
    # cannot be told apart from the others: it keeps the model's value (e.g. attention in packs
    # of short chat samples; measure a long-document pack to fit it).
    share = (X * current) / y[:, None]
    free[:3] &= share[:, :3].max(axis=0) >= min_share
    if int(free.sum()) > len(points):
        raise ValueError(
            f"calibrate: {int(free.sum())} unknowns but only {len(points)} points; measure more configurations"
        )
    w = 1.0 / y
    fitted = current.copy()
    # Active set: a coefficient the fit makes non-positive (an efficiency above 1 / infinite, a
    # negative overhead) is not determined by these points -- e.g. attention time that is a
    # tiny, nearly collinear share of every point. It keeps the model's value; the rest is refit.
    while free.any():
        fixed_part = X[:, ~free] @ fitted[~free]
        coef, *_ = np.linalg.lstsq(X[:, free] * w[:, None], (y - fixed_part) * w, rcond=None)
        bad = coef <= 0
        if not bad.any():
            fitted[free] = coef
            break
        idx = np.flatnonzero(free)
        free[idx[bad]] = False
    eff = replace(
        e,
        dense_mfu=float(np.clip(1 / max(fitted[0], 1e-9), 1e-3, 1.0)),
        attention_mfu=float(np.clip(1 / max(fitted[1], 1e-9), 1e-3, 1.0)),
        nvlink_efficiency=float(np.clip(1 / max(fitted[2], 1e-9), 1e-3, 1.0)),
        microbatch_overhead_s=float(max(fitted[3], 0.0)),
    )
    cal = cost_model.with_efficiency(eff)
    predicted = np.array([_predict(cal, p) for p in points])
    return CalibrationReport(efficiency=eff, predicted_s=predicted, measured_s=y)


def _predict(cost_model: CostModel, point: CalibrationPoint) -> float:
    return (
        AnalyticProfiler(cost_model)
        .profile(point.packs, point.pack_length, point.cp, point.recompute_layers)
        .time_s
    )


def measure_points(profiler: Profiler, settings: list[tuple[list, int, int, int]]) -> list[CalibrationPoint]:
    """Profile ``(packs, pack_length, cp, recompute_layers)`` settings into calibration points."""
    out = []
    for packs, length, cp, k in settings:
        r = profiler.profile(packs, length, cp, k)
        out.append(
            CalibrationPoint(packs=packs, pack_length=length, cp=cp, recompute_layers=k, time_s=r.time_s)
        )
    return out


def profile_packs(
    lengths: np.ndarray, pack_length: int, num_packs: int, *, seed: int = 0, pad_multiple: int = 16
) -> list[np.ndarray]:
    """``num_packs`` packs of ``pack_length`` drawn from the data ("hybrid data"): samples no longer
    than the pack in a seeded random order, next-fit (lengths rounded up to ``pad_multiple`` while
    fitting, so the pack also fits after CP padding up to cp = pad_multiple / 2)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    pool = lengths[order]
    pool = pool[pool <= pack_length]
    if not len(pool):
        raise ValueError(f"no sample fits a pack of {pack_length} tokens")
    padded = -(-pool // pad_multiple) * pad_multiple
    packs, cur, used, i = [], [], 0, 0
    n = len(pool)
    while len(packs) < num_packs:
        if i == n:  # wrap around: small data sets still give full packs
            i = 0
        p = int(padded[i])
        if used + p > pack_length:
            packs.append(np.array(cur, dtype=np.int64))
            cur, used = [], 0
            continue
        cur.append(int(pool[i]))
        used += p
        i += 1
    return packs


def calibration_settings(
    lengths: np.ndarray,
    num_layers: int,
    *,
    pack_lengths=(4096, 8192, 16384, 32768),
    tokens_per_setting: int = 32768,
    seed: int = 0,
) -> list[tuple[list, int, int, int]]:
    """The issue's single-GPU calibration grid: CP 1, each pack length with 0, half and all layers
    recomputed (12 settings for 4 lengths), packs drawn from ``lengths`` (:func:`profile_packs`)
    so that every setting processes about ``tokens_per_setting`` tokens.

    Returns ``(packs, pack_length, cp, recompute_layers)`` tuples for ``measure_points``."""
    out = []
    for length in pack_lengths:
        packs = profile_packs(lengths, length, max(1, tokens_per_setting // length), seed=seed)
        for k in sorted({0, num_layers // 2, num_layers}):
            out.append((packs, length, 1, k))
    return out


def holdout_calibration(
    cost_model: CostModel, points: list[CalibrationPoint], holdout_every: int = 3
) -> tuple[CalibrationReport, np.ndarray]:
    """Fit on all points but every ``holdout_every``-th and report the relative errors of the fitted
    model on the held-out ones: (fit report, held-out relative errors)."""
    held = [p for i, p in enumerate(points) if i % holdout_every == holdout_every - 1]
    train = [p for i, p in enumerate(points) if i % holdout_every != holdout_every - 1]
    if not held or not train:
        raise ValueError("holdout_calibration: need points both to fit and to hold out")
    rep = calibrate(cost_model, train)
    fitted = cost_model.with_efficiency(rep.efficiency)
    pred = np.array([_predict(fitted, p) for p in held])
    meas = np.array([p.time_s for p in held])
    return rep, (pred - meas) / meas
