"""The HBP training loop on Megatron-Core (``examples/pretrain_llama_hbp.py`` calls :func:`main`).

Per plan step: set the step's recompute, take this rank's micro-batches (the step's CP
degree decides replica and CP rank), run Megatron's ``forward_backward_func`` with the
stable loss, let Megatron DDP reduce gradients over all data x context ranks, clip, step
AdamW and the warmup + cosine schedule, log, checkpoint.

Launch: ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*), Slurm ``srun``
(SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; export MASTER_ADDR / MASTER_PORT), or a
single plain process. gloo + the CPU shim without CUDA, NCCL + bf16 with CUDA.

Everything that can be checked before training is checked first (:func:`preflight`), with
errors that say what to change: unknown preset, missing sample info or data file, a plan for
another world size or another sample info, CP degrees that do not fit, an obvious OOM.

This module only re-exports the trainer's names; the code lives in small modules (docs/architecture.md):
``launch`` (environment, distributed init), ``inputs`` (tokenizer/template, sample info and plan
building, the ``init_from`` check), ``memory`` (the OOM rule), ``preflight`` (the checks before
the model), ``parallel`` (:class:`ParallelGroups`, the one reader of Megatron's ``parallel_state``),
``build`` (model, DDP + optimizer, schedule, resume), ``step`` (one optimizer step), ``step_log``
(banner and metrics record), ``loop`` (:func:`run`) and ``cli`` (:func:`main`).
"""

from __future__ import annotations

from megatron_hbp.mcore.build import wrap_ddp_and_optimizer
from megatron_hbp.mcore.cli import config_from_args, main, parse_args
from megatron_hbp.mcore.inputs import (
    _build_plan,
    _build_sample_info,
    check_init_from,
    init_dir_files,
    resolve_tokenizer_and_template,
    template_from_jinja,
)
from megatron_hbp.mcore.launch import (
    TrainSetupError,
    _all_ok,
    _shutdown,
    _use_bf16,
    dist_env,
    init_distributed,
)
from megatron_hbp.mcore.loop import run
from megatron_hbp.mcore.memory import (
    GroupMemory,
    _device_memory_limit,
    _rmsnorm_fused,
    check_memory,
    hardware_for_device,
    memory_verdicts,
    trainer_cost_model,
)
from megatron_hbp.mcore.parallel import ParallelGroups
from megatron_hbp.mcore.preflight import (
    Prepared,
    _accumulates_replicas,
    _check_first_samples,
    _fewer_dp,
    _fewer_ranks_hint,
    preflight,
)

__all__ = [
    "GroupMemory",
    "ParallelGroups",
    "Prepared",
    "TrainSetupError",
    "_accumulates_replicas",
    "_all_ok",
    "_build_plan",
    "_build_sample_info",
    "_check_first_samples",
    "_device_memory_limit",
    "_fewer_dp",
    "_fewer_ranks_hint",
    "_rmsnorm_fused",
    "_shutdown",
    "_use_bf16",
    "check_init_from",
    "check_memory",
    "config_from_args",
    "dist_env",
    "hardware_for_device",
    "init_dir_files",
    "init_distributed",
    "main",
    "memory_verdicts",
    "parse_args",
    "preflight",
    "resolve_tokenizer_and_template",
    "run",
    "template_from_jinja",
    "trainer_cost_model",
    "wrap_ddp_and_optimizer",
]
