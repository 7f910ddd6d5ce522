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

The cross entropy comes from one function, :func:`token_losses`: Megatron's vocab-parallel CE
on materialised logits (any TP, any weights), or the fused linear + CE kernel
``megatron_hbp.kernels.token_balanced_cross_entropy`` through GPTModel's ``output_processor``
(no ``[t, V]`` logits; vocab-parallel; uniform weights, i.e. the stable loss).
"""

from __future__ import annotations

import functools

import torch

LOSS_IMPLS = ("auto", "megatron", "fused")


def resolve_loss_impl(requested: str, loss_normalization: str) -> str:
    """``auto``: the fused kernel on CUDA for the stable loss (uniform token weights), else
    Megatron's vocab-parallel CE on materialised logits."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"loss_impl '{requested}' unknown; choose one of {', '.join(LOSS_IMPLS)}")
    if requested == "fused" and loss_normalization != "step_token_mean":
        raise ValueError(
            f"loss_impl 'fused' sums uniformly weighted tokens; it cannot do loss_normalization "
            f"'{loss_normalization}': use loss_impl 'megatron'"
        )
    if requested == "auto":
        return (
            "fused" if torch.cuda.is_available() and loss_normalization == "step_token_mean" else "megatron"
        )
    return requested


def _fused_output_processor(*, hidden_states, output_layer, output_weight, labels, loss_mask, context, **_):
    """GPTModel ``output_processor``: Σ CE over loss tokens from the hidden states, no logits."""
    from megatron_hbp.kernels import token_balanced_cross_entropy

    weight = output_weight if output_weight is not None else output_layer.weight
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])  # [s, 1, h] -> [s, h]
    targets = labels.reshape(-1).masked_fill(loss_mask.reshape(-1) == 0, -100)
    return token_balanced_cross_entropy(
        hidden, weight, targets, None, tp_group=context["tp_group"], backend=context.get("backend", "auto")
    )


def token_losses(
    model, inputs: dict, impl: str = "megatron", kernel_backend: str = "auto", tp_group=None
) -> torch.Tensor:
    """The one loss seam. ``megatron``: fp32 ``[1, t]`` per-token CE (weights applied by
    ``loss_func``). ``fused``: 0-dim Σ CE over the loss tokens (weights must all be 1), computed
    by the kernel's ``kernel_backend`` (``triton`` forces the Triton path, also on CPU under
    TRITON_INTERPRET=1) and reduced over ``tp_group`` (the tensor-parallel group when tp > 1,
    ``ParallelGroups.tp_group``; None for tp = 1)."""
    if impl == "fused":
        return model(
            inputs["tokens"],
            None,
            None,
            labels=inputs["labels"],
            loss_mask=inputs["loss_mask"],
            packed_seq_params=inputs["packed_seq_params"],
            output_processor=_fused_output_processor,
            output_processor_context={
                "tp_group": tp_group if tp_group is not None and tp_group.size() > 1 else None,
                "backend": kernel_backend,
            },
        )
    return model(
        inputs["tokens"],
        None,
        None,
        labels=inputs["labels"],
        packed_seq_params=inputs["packed_seq_params"],
    )


def loss_func(loss_weight: torch.Tensor, denominator: int, output: torch.Tensor):
    """Megatron 3-tuple: ``(Σ w·ce, int denominator, report [weighted sum, denominator])``.

    ``output`` is the per-token CE ``[1, t]`` or, from the fused path, the already summed 0-dim
    loss (uniform weights)."""
    if output.dim() == 0:
        weighted = output.float()
    else:
        weighted = (output.float().reshape(-1) * loss_weight.reshape(-1)).sum()
    denom = torch.tensor(denominator, dtype=torch.int, device=weighted.device)
    report = torch.stack([weighted.detach(), denom.to(weighted.dtype)])
    return weighted, denom, {"loss": report}


def forward_step(data_iterator, model, impl: str = "megatron", kernel_backend: str = "auto", tp_group=None):
    """``forward_step_func`` for ``get_forward_backward_func()``: one micro-batch."""
    inputs = next(data_iterator)
    output = token_losses(model, inputs, impl, kernel_backend, tp_group)
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
