"""Launch environment and distributed init: torchrun / Slurm / single process, NCCL or gloo
(CPU shim without CUDA), the all-ranks agreement, the dtype choice and the shutdown.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import torch

from megatron_hbp.mcore import preflight_checks as checks
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.shim import install_cpu_shim


class TrainSetupError(RuntimeError):
    """A problem found before training starts; the message says what to change."""


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, Slurm, or a single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" not in env:
            raise TrainSetupError(
                "running under Slurm without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames "
                '"$SLURM_JOB_NODELIST" | head -n1) and MASTER_PORT (e.g. 29500) before srun'
            )
        env.setdefault("MASTER_PORT", "29500")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))
    return 0, 1, 0


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU; CPU shim when CUDA is absent)."""
    rank, world, local_rank = dist_env()
    checks.quiet_other_ranks(rank)  # third-party import warnings: rank 0 prints them once
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        install_cpu_shim()
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30)
        )
    return rank, world, device


def _all_ok(ok: bool) -> bool:
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if torch.cuda.is_available():
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return int(t.item()) == 0


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.dtype == "auto":
        return torch.cuda.is_available()
    return cfg.dtype == "bf16"


def _shutdown() -> None:
    if torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
