"""What the trainer says: the start banner and one metrics record per plan step.

The record's fields and their order are the ``metrics.jsonl`` format (docs/training.md); the
logging rank writes it with ``metrics.MetricsLogger``.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_hbp.mcore.metrics import model_flops


def print_start_banner(
    cfg, prep, groups, *, bf16: bool, loss_impl: str, layer_kernels: str, start: int, end: int
):
    """Rank 0's one-line summary of the run (and the CP attention when a step has cp > 1)."""
    if groups.rank != 0:
        return
    plan = prep.plan
    degrees = sorted({int(g.cp) for g in plan.groups})
    print(
        f"[hbp] training {prep.model_cfg.name} ({prep.model_cfg.num_parameters() / 1e6:.1f}M params) on {groups.world} "
        f"ranks (tp={groups.tp}, pp={groups.pp}, dp x cp={prep.dp_size}), {'bf16' if bf16 else 'fp32'}, loss {loss_impl}, layer kernels {layer_kernels}, plan steps "
        f"{start}..{end - 1} of {plan.num_steps}, CP degrees {degrees}",
        flush=True,
    )
    if any(c > 1 for c in degrees):
        print(
            f"[hbp] CP attention: {prep.cp_impl} (cp_backend {cfg.cp_backend}: {prep.cp_impl_why})",
            flush=True,
        )


def step_record(
    s: int, step, result, pairs_per_rank: list[float], comm: int, *, n_mb: int, cp_impl: str
) -> dict:
    """The metrics record of plan step ``s`` (``result``: the step's ``step.StepResult``)."""
    cp = int(step.cp)
    tokens = int(step.num_tokens)
    dt = result.step_time_s
    mean_pairs = float(np.mean(pairs_per_rank)) if pairs_per_rank else 0.0
    return {
        "step": s,
        "group": int(step.group),
        "cp": cp,
        "recompute_layers": int(step.recompute_layers),
        "loss": result.loss,
        "grad_norm": float(result.grad_norm) if result.grad_norm is not None else float("nan"),
        "lr": result.lr,
        "tokens": tokens,
        "loss_tokens": int(step.loss_tokens),
        "micro_batches": n_mb,
        "step_time_s": dt,
        "tokens_per_s": tokens / dt if dt > 0 else 0.0,
        "attn_pairs_per_rank": pairs_per_rank,
        "attn_imbalance": (max(pairs_per_rank) / mean_pairs) if mean_pairs > 0 else 1.0,
        "update_ok": bool(result.update_ok),
        "cp_comm_bytes_per_rank": comm,
        "cp_backend": cp_impl if cp > 1 else "none",
    }


def add_gpu_fields(rec: dict, model_cfg, *, peak: float | None, world: int) -> None:
    """Peak memory and MFU (CUDA only; ``peak``: the GPU's dense bf16 TFLOP/s, None if unknown)."""
    if not torch.cuda.is_available():
        return
    rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    if peak:
        flops = model_flops(model_cfg, rec["tokens"], sum(rec["attn_pairs_per_rank"]))
        rec["mfu"] = flops / (rec["step_time_s"] * peak * 1e12 * world)
