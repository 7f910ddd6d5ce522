"""One plan step: Megatron's forward/backward over this rank's micro-batches with the stable
loss, gradient reduction over all data x context ranks (Megatron DDP), clipping, the Adam
step and the schedule step; the checks that the step's CP group has the plan's degree and
that Megatron's loss denominator equals the plan's (``planner.workload.step_denominators``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hbp.mcore.batch import to_model_inputs
from megatron_hbp.mcore.loss import forward_step, reduce_reports
from megatron_hbp.mcore.parallel import ParallelGroups


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step returns to the loop."""

    loss: float
    """Σ weighted token losses / Σ denominators of the step (all ranks)."""
    denominator: float
    """Megatron's all-reduced token denominator."""
    grad_norm: float | None
    update_ok: bool
    lr: float
    """The learning rate the update used."""
    step_time_s: float


@dataclass(frozen=True)
class StepRunner:
    """The fixed parts of every step: the model, its optimizer and schedule, the loss."""

    model: object
    optimizer: object
    scheduler: object
    groups: ParallelGroups
    device: torch.device
    cp_impl: str
    forward_step_func: object
    on_grads: object = None
    forward_backward_func: object = None

    @classmethod
    def create(
        cls, model, optimizer, scheduler, groups, device, *, cp_impl, loss_impl, layer_kernels, on_grads=None
    ):
        kernel_backend = "triton" if layer_kernels == "triton" else "auto"  # of the fused loss kernel
        step_fn = functools.partial(
            forward_step, impl=loss_impl, kernel_backend=kernel_backend, tp_group=groups.tp_group
        )
        return cls(
            model,
            optimizer,
            scheduler,
            groups,
            device,
            cp_impl,
            step_fn,
            on_grads,
            get_forward_backward_func(),
        )

    def run(self, s: int, cp: int, host_batches: list) -> StepResult:
        """Forward/backward of ``host_batches`` (plan step ``s``, CP degree ``cp``), then the update."""
        model, optimizer = self.model, self.optimizer
        cp_group = self.groups.cp_group(cp)
        check_step_cp(s, self.groups.rank, cp_group, cp, host_batches)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = iter([to_model_inputs(b, self.device, cp_group, self.cp_impl) for b in host_batches])
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = self.forward_backward_func(
            forward_step_func=self.forward_step_func,
            data_iterator=inputs,
            model=[model],
            num_microbatches=len(host_batches),
            seq_length=max(int(b.tokens.numel()) for b in host_batches),
            micro_batch_size=1,
            forward_only=False,
        )
        if self.on_grads is not None:
            self.on_grads(s, model)
        lr_applied = float(optimizer.param_groups[0]["lr"])  # the scheduler set it for this step
        ok, grad_norm, _ = optimizer.step()
        self.scheduler.step(increment=1)
        loss, denom = reduce_reports(reports, self.device, self.groups.tp)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return StepResult(loss, denom, grad_norm, bool(ok), lr_applied, dt)


def check_step_cp(s: int, rank: int, cp_group, cp: int, host_batches) -> None:
    """The step's CP group and its micro-batches must have the plan's CP degree ``cp``."""
    group_cp = cp_group.size() if cp_group is not None else 1
    if group_cp != cp or any(int(b.cp) != cp for b in host_batches):
        raise RuntimeError(
            f"plan step {s}, rank {rank}: the step's CP group has {group_cp} ranks and its micro-batches cp "
            f"{sorted({int(b.cp) for b in host_batches})}, but the plan's work item says cp {cp}; the data "
            "loader or the CP groups do not follow the plan (restart with the plan the run was started with)"
        )


def check_denominator(cfg, s: int, rank: int, denominator: float, plan_denominator: int) -> None:
    """Megatron's all-reduced loss denominator of step ``s`` must equal the plan's
    (``planner.workload.step_denominators``): the stable-loss proof, with no extra collective."""
    if cfg.check_loss_tokens and int(round(denominator)) != int(plan_denominator):
        raise RuntimeError(
            f"plan step {s}, rank {rank}: Megatron's all-reduced loss denominator {denominator} differs from the "
            f"plan's {int(plan_denominator)} ({cfg.loss_normalization}); the plan or sample info does not match "
            "the data (rebuild both)"
        )
