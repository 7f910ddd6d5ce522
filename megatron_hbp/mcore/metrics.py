"""Per-step metrics: console line, JSONL file (``--metrics-file``), TensorBoard when installed.

Each JSONL record (rank 0 writes): ``step`` (plan step index, 0-based), ``group``, ``cp``,
``recompute_layers``, ``loss``, ``grad_norm``, ``lr``, ``tokens`` (real tokens of the step,
all ranks), ``loss_tokens`` (plan count), ``micro_batches`` (per replica), ``step_time_s``,
``tokens_per_s``, ``attn_pairs_per_rank`` (causal (q, k) pairs each data x context rank
computed this step, in units of all heads, from the plan: ``Plan.workload.entry_pairs(cp_impl)``),
``attn_imbalance`` (max / mean of those), ``cp_comm_bytes_per_rank`` (bytes the logging rank
sends for CP attention this step, ``megatron_hbp.planner.workload.cp_comm_bytes``; 0 for CP 1
steps), ``update_ok``, and on GPU
``peak_mem_gb`` and ``mfu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_hbp.costmodel.hardware import hardware_for_device_name
from megatron_hbp.kernels import attention_pairs_to_flops
from megatron_hbp.planner.workload import cp_comm_bytes


def step_rank_work(
    workload,
    step: int,
    *,
    dp_rank: int,
    dp_size: int,
    cp_impl: str,
    model_cfg,
    tp: int = 1,
    pp: int = 1,
    dtype_bytes: int = 2,
) -> tuple[list[float], int]:
    """From the plan's workload (``Plan.workload``, no recount, no collective): the causal pairs of
    every data x context rank of the launch in ``step`` (``attn_pairs_per_rank``) and the bytes
    rank ``dp_rank`` sends for CP attention in it (``cp_comm_bytes_per_rank``)."""
    pairs = workload.rank_values(workload.entry_pairs(cp_impl), step, dp_size).tolist()
    cp = int(workload.step_cp[step])
    comm = 0
    if cp > 1:
        tokens = workload.pack_padded_tokens[workload.rank_packs(step, dp_rank, dp_size)]
        per_mb = cp_comm_bytes(
            tokens, cp, cp_impl=cp_impl, num_heads=model_cfg.num_attention_heads // tp,
            num_kv_heads=model_cfg.num_query_groups // tp, head_dim=model_cfg.head_dim,
            num_layers=model_cfg.num_layers // pp, recompute_layers=int(workload.step_recompute_layers[step]),
            dtype_bytes=dtype_bytes,
        )  # fmt: skip
        comm = int(per_mb.sum())
    return pairs, comm


def peak_tflops(device_name: str | None = None) -> float | None:
    """Dense BF16 peak of one GPU, TFLOP/s, from its cost-model hardware profile
    (``megatron_hbp/costmodel/hardware/*.yaml``); None without CUDA or for a GPU without one."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    hardware = hardware_for_device_name(device_name)
    return hardware.bf16_dense_tflops if hardware is not None else None


def model_flops(model_cfg, tokens: int, attn_pairs: int) -> float:
    """Training FLOPs of one step (forward + backward, recompute not counted: MFU convention).

    ``6 · N_dense · tokens`` (weights except embeddings: 2 forward + 4 backward per weight and
    token) + ``6 · vocab · hidden · tokens`` (output layer) + attention from
    ``megatron_hbp.kernels.attention_pairs_to_flops``: ``4 · head_dim`` forward FLOPs per causal
    (q, k) pair, query head and layer, backward 2x the forward, so ``12 · pairs · heads · head_dim
    · layers``. ``tokens``: real tokens of the step (all ranks); ``attn_pairs``: pairs summed over
    all data x context ranks.
    """
    n_params = model_cfg.num_parameters() - model_cfg.vocab_size * model_cfg.hidden_size * (
        1 if model_cfg.tie_embeddings else 2
    )
    dense = 6.0 * n_params * tokens
    logits = 6.0 * model_cfg.vocab_size * model_cfg.hidden_size * tokens
    attn = attention_pairs_to_flops(
        int(attn_pairs),
        num_heads=model_cfg.num_attention_heads,
        head_dim=model_cfg.head_dim,
        num_layers=model_cfg.num_layers,
        include_backward=True,
        backward_factor=2.0,
    )
    return dense + logits + float(attn)


class MetricsLogger:
    """Console + JSONL + TensorBoard sink; only the logging rank writes."""

    def __init__(
        self, path: str | None, *, enabled: bool, tensorboard_dir: str | None = None, resume: bool = False
    ):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a" if resume else "w")  # noqa: SIM115 - closed by close()
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tensorboard_dir)
            except Exception:  # tensorboard not installed: JSONL only
                self.tb = None

    def log(self, record: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        if console:
            parts = [
                f"step {record['step']:>5d}",
                f"group {record['group']}",
                f"cp {record['cp']}",
                f"loss {record['loss']:.4f}",
                f"grad_norm {record['grad_norm']:.3f}",
                f"lr {record['lr']:.3e}",
                f"tokens {record['tokens']}",
                f"loss_tokens {record['loss_tokens']}",
                f"{record['step_time_s'] * 1000:.0f} ms",
                f"{record['tokens_per_s']:.0f} tok/s",
                f"attn_imb {record['attn_imbalance']:.2f}",
            ]
            if record.get("cp_comm_bytes_per_rank"):
                parts.append(f"cp_comm {record['cp_comm_bytes_per_rank'] / 2**20:.1f} MiB")
            if record.get("recompute_layers"):
                parts.append(f"recompute {record['recompute_layers']}")
            if record.get("mfu") is not None:
                parts.append(f"mfu {record['mfu'] * 100:.1f}%")
            if record.get("peak_mem_gb") is not None:
                parts.append(f"mem {record['peak_mem_gb']:.1f} GB")
            print(" | ".join(parts), flush=True)
        if self.file:
            self.file.write(json.dumps(record, default=_json_default) + "\n")
            self.file.flush()
        if self.tb:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "attn_imbalance", "mfu", "peak_mem_gb"):
                if record.get(key) is not None:
                    self.tb.add_scalar(key, record[key], record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    raise TypeError(type(x))
