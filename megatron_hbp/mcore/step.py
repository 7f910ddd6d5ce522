"""One plan step: Megatron's forward/backward over this rank's micro-batches with the stable
loss, gradient reduction over all data x context ranks (Megatron DDP), clipping, the Adam
step and the schedule step; then the step's world-wide statistics and the check that the
micro-batches hold the plan's loss tokens.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hbp.mcore.batch import to_model_inputs
from megatron_hbp.mcore.loss import forward_step, reduce_reports
from megatron_hbp.mcore.metrics import rank_attention_pairs
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


def gather_step_stats(
    host_batches, groups: ParallelGroups, device, *, cp_impl: str
) -> tuple[int, list[float]]:
    """``(loss tokens of the step, attention pairs per data x context rank)`` from one world all-gather."""
    local_loss_tokens = sum(b.local_loss_tokens for b in host_batches)
    pairs = rank_attention_pairs(host_batches, cp_impl)
    stats = torch.tensor([local_loss_tokens, pairs], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(stats) for _ in range(groups.world)]
    torch.distributed.all_gather(gathered, stats)
    loss_tokens_total = int(sum(x[0] for x in gathered_unique(gathered, groups.tp, groups.pp)))
    pairs_per_rank = [float(x[1]) for x in gathered_unique(gathered, groups.tp, groups.pp)]
    return loss_tokens_total, pairs_per_rank


def check_loss_tokens(cfg, s: int, step, loss_tokens_total: int, denominator: float) -> None:
    """The step's micro-batches (and Megatron's denominator) must hold the plan's loss tokens."""
    if not cfg.check_loss_tokens:
        return
    if loss_tokens_total != int(step.loss_tokens):
        raise RuntimeError(
            f"plan step {s}: the micro-batches hold {loss_tokens_total} loss tokens but the plan says "
            f"{int(step.loss_tokens)}; the plan or sample info does not match the data (rebuild both)"
        )
    if cfg.loss_normalization == "step_token_mean" and int(round(denominator)) != int(step.loss_tokens):
        raise RuntimeError(
            f"plan step {s}: Megatron's all-reduced token count {denominator} differs from the plan's "
            f"{int(step.loss_tokens)}"
        )


def gathered_unique(gathered: list[torch.Tensor], tp: int, pp: int) -> list[list[float]]:
    """One entry per data x context rank from a world all-gather (TP/PP copies dropped).

    Megatron's default order puts TP innermost, then DP, then PP: the ranks with tp_rank 0
    of the first pipeline stage are ``0, tp, 2·tp, ...`` up to ``dp·tp``.
    """
    world = len(gathered)
    dp = world // (tp * pp)
    return [gathered[i * tp].tolist() for i in range(dp)]
