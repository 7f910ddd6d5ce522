"""Stable loss (HBP.md 3.3) on Megatron's per-token-loss contract.

Megatron's ``forward_step`` calls our ``loss_func(output)``, which returns
``(Σ_t weight_t · ce_t, denominator, report)``. With ``calculate_per_token_loss=True``
Megatron (1) back-propagates the un-normalised sum of every micro-batch, (2) sums the integer
denominators over micro-batches, (3) all-reduces that sum over the data x context group and
(4) divides every gradient by it (``finalize_model_grads``). With the default
``step_token_mean`` weights (1 on loss tokens) the denominator is the step's loss-token count,
which the plan also knows (``Step.loss_tokens``); the trainer checks both agree every step,
so the loss is Σ token losses / step loss tokens whatever the split into micro-batches,
replicas and CP ranks.

The per-token cross entropy comes from one function, :func:`token_losses`: Megatron's
vocab-parallel CE on the logits (any TP); the fused kernel
``megatron_hbp.kernels.token_balanced_cross_entropy`` plugs in here when it lands.
"""

from __future__ import annotations

import functools

import torch


def token_losses(model, inputs: dict) -> torch.Tensor:
    """fp32 ``[1, t]`` cross entropy of every token (0 weight handled by the caller)."""
    return model(
        inputs["tokens"],
        None,
        None,
        labels=inputs["labels"],
        packed_seq_params=inputs["packed_seq_params"],
    )


def loss_func(loss_weight: torch.Tensor, denominator: int, output: torch.Tensor):
    """Megatron 3-tuple: ``(Σ w·ce, int denominator, report [weighted sum, denominator])``."""
    losses = output.float().reshape(-1)
    weighted = (losses * loss_weight.reshape(-1)).sum()
    denom = torch.tensor(denominator, dtype=torch.int, device=losses.device)
    report = torch.stack([weighted.detach(), denom.to(torch.float64).to(weighted.dtype)])
    return weighted, denom, {"loss": report}


def forward_step(data_iterator, model):
    """``forward_step_func`` for ``get_forward_backward_func()``: one micro-batch."""
    inputs = next(data_iterator)
    output = token_losses(model, inputs)
    return output, functools.partial(loss_func, inputs["loss_weight"], inputs["denominator"])


def reduce_reports(reports: list[dict], device, tp: int = 1) -> tuple[float, float]:
    """Sum the micro-batch reports of this rank and all-reduce over the world.

    Only last pipeline stages hold reports and every TP rank holds the same one, so the
    world sum over-counts numerator and denominator alike by ``tp``. Returns
    ``(loss, denominator)`` with ``loss = Σ weighted / Σ denominator`` of the step.
    """
    if reports:
        total = torch.stack([r["loss"].double() for r in reports]).sum(0).to(device)
    else:
        total = torch.zeros(2, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    num, den = (total / tp).tolist()
    return (num / den if den > 0 else float("nan")), den
