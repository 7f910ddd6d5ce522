"""Per-step metrics: console line, JSONL file (``--metrics-file``), TensorBoard when installed.

Each JSONL record (rank 0 writes): ``step`` (plan step index, 0-based), ``group``, ``cp``,
``recompute_layers``, ``loss``, ``grad_norm``, ``lr``, ``tokens`` (real tokens of the step,
all ranks), ``loss_tokens`` (plan count), ``micro_batches`` (per replica), ``step_time_s``,
``tokens_per_s``, ``attn_pairs_per_rank`` (causal (q, k) pairs each data x context rank
computed this step, ``megatron_hbp.kernels.attention_cost``), ``attn_imbalance``
(max / mean of those), ``cp_comm_bytes_per_rank`` (bytes one rank sends for CP attention this
step, ``megatron_hbp.cp.cp_comm_bytes``; 0 for CP 1 steps), ``update_ok``, and on GPU
``peak_mem_gb`` and ``mfu``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megatron_hbp.kernels import attention_cost, attention_pairs_to_flops

# Dense bf16 peak of one GPU, TFLOP/s (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0}


def rank_attention_pairs(batches, cp_impl: str = "allgather") -> float:
    """Causal (query, key) pairs this rank computes for its micro-batches of one step, in units of
    all heads (``megatron_hbp.kernels.attention_cost``): exact per zigzag CP rank for the all-gather
    scheme; for Ulysses (every rank: whole documents on H / c heads) the pack's total / c."""
    total = 0.0
    for b in batches:
        lengths = torch.tensor(b.lengths, dtype=torch.int64)
        offsets = torch.tensor([0, len(b.lengths)], dtype=torch.int64)
        if b.cp > 1 and cp_impl == "ulysses":
            total += int(attention_cost(lengths, offsets, 1, backend="torch")[0, 0]) / b.cp
        else:
            total += int(attention_cost(lengths, offsets, b.cp, backend="torch")[0, b.cp_rank])
    return total


def peak_tflops(device_name: str | None = None) -> float | None:
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


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
