"""The training loop (:func:`run`), as a sequence of named steps.

setup (:func:`init_distributed`, :func:`preflight`, :func:`init_model_parallel`) ->
model and optimizer (``build``) -> resume -> for each plan step: fetch this rank's
micro-batches, one optimizer step (``step``), log (``step_log``), maybe save, stop on
pre-emption.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass

import numpy as np
import torch

from megatron_hbp.data.token_files import open_sft_dataset
from megatron_hbp.mcore import build
from megatron_hbp.mcore import checkpoint as ckpt
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.data import make_loader, rank_work_items
from megatron_hbp.mcore.launch import _use_bf16, init_distributed
from megatron_hbp.mcore.loss import resolve_loss_impl
from megatron_hbp.mcore.metrics import MetricsLogger, peak_tflops, step_rank_work
from megatron_hbp.mcore.model import set_recompute
from megatron_hbp.mcore.parallel import ParallelGroups, init_model_parallel
from megatron_hbp.mcore.preemption import Preempted, PreemptionWatcher
from megatron_hbp.mcore.preflight import Prepared, _check_first_samples, preflight
from megatron_hbp.mcore.step import StepRunner, check_denominator
from megatron_hbp.mcore.step_log import add_gpu_fields, print_start_banner, step_record
from megatron_hbp.planner.workload import step_denominators


@dataclass
class Trainer:
    """Everything the loop needs, built once by :func:`setup`."""

    cfg: TrainConfig
    prep: Prepared
    groups: ParallelGroups
    device: torch.device
    bf16: bool
    runner: StepRunner
    meta: dict
    """The checkpoint meta (``build.checkpoint_meta``)."""
    start: int
    end: int
    batches: object
    """Iterator over this rank's host micro-batches, in plan order from ``start``."""
    logger: MetricsLogger
    denominators: object
    """Megatron's all-reduced loss denominator of every plan step, from the plan
    (``planner.workload.step_denominators``; checked each step)."""


def _release_previous_run() -> None:
    # The model and optimizer of an earlier run() in this process are cyclic garbage (Megatron's
    # hooks refer back to the model): free them before this run allocates. Python's collector
    # alone may not have run, and on a GPU that memory (18 B/param) can make this run OOM.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds third-party code using the global RNG
    random.seed(seed)  # so is Python's (every RNG a checkpoint restores starts from the seed)


def _open_batches(cfg: TrainConfig, prep: Prepared, groups: ParallelGroups, start: int, end: int):
    """This rank's micro-batches of plan steps ``start..end-1`` (a prefetching loader)."""
    dataset = open_sft_dataset(  # token files by mmap when they exist, else the JSONL
        prep.sample_info if not isinstance(cfg.data.sample_info, str) else cfg.data.sample_info
    )
    if groups.rank == 0:
        src = getattr(dataset, "paths", None)
        print(
            f"[hbp] samples from {src.tokens + '.bin (mmap)' if src else 'the JSONL (tokenised on access)'}",
            flush=True,
        )
    # The padding id never matters, so 0 is used: padding sits after a document's real tokens inside
    # its own (causal) span, so no real token attends to it; it is never a target (label 0, loss
    # weight 0), hence its logits, and the embedding row it reads, get exactly zero gradient; a
    # padding-only micro-batch has no loss tokens at all.
    pad_id = 0
    _check_first_samples(prep, dataset, groups.dp_rank, start)
    items = rank_work_items(prep.plan, groups.dp_rank, start, end, dp_size=prep.dp_size)
    loader = make_loader(
        items,
        dataset,
        pad_id=pad_id,
        loss_normalization=cfg.loss_normalization,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    return iter(loader)


def setup(cfg: TrainConfig, *, on_grads=None) -> Trainer:
    """Distributed init, pre-flight, process groups, model + optimizer + schedule, resume, data."""
    _release_previous_run()
    rank, world, device = init_distributed()
    prep = preflight(cfg, world, rank)
    plan = prep.plan
    degrees = sorted({int(g.cp) for g in plan.groups})
    groups = init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed, cp_degrees=degrees)
    _seed(cfg.seed)
    bf16 = _use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    layer_kernels = build.resolve_layer_kernels(cfg)
    model = build.build_train_model(cfg, prep, groups, dtype=dtype, layer_kernels=layer_kernels)
    model, optimizer = build.wrap_ddp_and_optimizer(model, cfg.optimizer, bf16=bf16, dtype=dtype)
    scheduler = build.build_scheduler(optimizer, cfg.optimizer, plan.num_steps)
    meta = build.checkpoint_meta(cfg, prep, groups)
    start = build.resume(cfg, groups, model, optimizer, scheduler, meta)
    end = plan.num_steps if cfg.max_steps is None else min(plan.num_steps, cfg.max_steps)
    batches = _open_batches(cfg, prep, groups, start, end)
    logger = MetricsLogger(
        cfg.metrics_file, enabled=groups.is_logger, tensorboard_dir=cfg.tensorboard_dir, resume=start > 0
    )
    loss_impl = resolve_loss_impl(cfg.loss_impl, cfg.loss_normalization)
    runner = StepRunner.create(
        model, optimizer, scheduler, groups, device,
        cp_impl=prep.cp_impl, loss_impl=loss_impl, layer_kernels=layer_kernels, on_grads=on_grads,
    )  # fmt: skip
    print_start_banner(
        cfg, prep, groups, bf16=bf16, loss_impl=loss_impl, layer_kernels=layer_kernels, start=start, end=end
    )
    denoms = step_denominators(
        plan.arrays, plan.workload, cfg.loss_normalization, prep.sample_info.loss_tokens
    )
    return Trainer(cfg, prep, groups, device, bf16, runner, meta, start, end, batches, logger, denoms)


def train_one_step(t: Trainer, s: int, peak: float | None) -> dict:
    """Plan step ``s``: fetch, step, check, and the metrics record (logged by the logging rank)."""
    cfg, prep = t.cfg, t.prep
    step = prep.plan.step(s)
    set_recompute(t.runner.model, int(step.recompute_layers))
    n_mb = int(step.micro_batches_per_replica) * (prep.plan.world_size // prep.dp_size)  # replicas per rank
    host_batches = [next(t.batches) for _ in range(n_mb)]
    result = t.runner.run(s, int(step.cp), host_batches)
    check_denominator(cfg, s, t.groups.rank, result.denominator, t.denominators[s])
    pairs_per_rank, comm = step_rank_work(  # from the plan's workload: no recount, no collective
        prep.plan.workload, s, dp_rank=t.groups.dp_rank, dp_size=prep.dp_size, cp_impl=prep.cp_impl,
        model_cfg=prep.model_cfg, tp=t.groups.tp, pp=t.groups.pp, dtype_bytes=2 if t.bf16 else 4,
    )  # fmt: skip
    rec = step_record(s, step, result, pairs_per_rank, comm, n_mb=n_mb, cp_impl=prep.cp_impl)
    add_gpu_fields(rec, prep.model_cfg, peak=peak, world=t.groups.world)
    t.logger.log(rec, console=(s - t.start) % cfg.log_interval == 0 or s == t.end - 1)
    return rec


def _save_due(cfg: TrainConfig, done: int, end: int) -> bool:
    return bool(
        cfg.checkpoint.dir
        and (
            (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0)
            or (cfg.checkpoint.save_at_end and done == end)
        )
    )


def train_loop(t: Trainer) -> list[dict]:
    """Run plan steps ``t.start..t.end-1``; save when due or pre-empted (then raise ``Preempted``)."""
    peak = peak_tflops()
    records = []
    r = t.runner
    r.model.train()
    preempt = PreemptionWatcher().install()  # SIGTERM / SIGUSR1: finish the step, save, stop
    for s in range(t.start, t.end):
        records.append(train_one_step(t, s, peak))
        done = s + 1
        save_now = _save_due(t.cfg, done, t.end)
        stop = preempt.requested(t.device)
        path = None
        if save_now or (stop and t.cfg.checkpoint.dir):
            path = build.save(t.cfg, done, t.groups, r.model, r.optimizer, r.scheduler, t.meta)
        elif t.cfg.checkpoint.async_save:
            ckpt.poll_saves()  # commits an async save whose files are written on every rank
        if stop:
            ckpt.wait_for_saves()
            preempt.close()
            t.logger.close()
            raise Preempted(done, path, preempt.signame)
    ckpt.wait_for_saves()
    preempt.close()
    t.logger.close()
    return records


def run(cfg: TrainConfig, *, on_grads=None) -> list[dict]:
    """Train according to ``cfg``; returns the metric records (on the logging rank).

    ``on_grads(step_index, model)``, if given, is called after the gradients of a step are
    reduced and normalised (``param.main_grad``) and before the optimizer uses them (tests).
    """
    return train_loop(setup(cfg, on_grads=on_grads))
