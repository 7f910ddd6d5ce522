"""What a run trains: the model (with its ``init_from`` weights), Megatron DDP and Adam, the
warmup + cosine schedule over the whole plan, the checkpoint meta, and the resume from
``checkpoint.load``.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_hbp.configio import to_dict
from megatron_hbp.convert import load_pretrained_into_model
from megatron_hbp.mcore import checkpoint as ckpt
from megatron_hbp.mcore.config import OptimizerConfig, TrainConfig
from megatron_hbp.mcore.launch import TrainSetupError
from megatron_hbp.mcore.model import build_model, select_layer_kernels
from megatron_hbp.mcore.parallel import ParallelGroups
from megatron_hbp.mcore.preflight import Prepared


def resolve_layer_kernels(cfg: TrainConfig) -> str:
    """``layer_kernels`` resolved for this machine (``torch`` or ``triton``)."""
    try:
        return select_layer_kernels(cfg.layer_kernels)
    except ValueError as e:
        raise TrainSetupError(f"layer_kernels: {e}") from None


def build_train_model(
    cfg: TrainConfig, prep: Prepared, groups: ParallelGroups, *, dtype: torch.dtype, layer_kernels: str
):
    """This rank's pipeline stage of the model, with the ``init_from`` weights unless resuming."""
    model = build_model(
        prep.model_cfg,
        tp=groups.tp,
        pp=groups.pp,
        dtype=dtype,
        attention_backend=cfg.attention_backend,
        layer_kernels=layer_kernels,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
    )
    if cfg.init_from is not None and not cfg.checkpoint.load:
        try:
            load_pretrained_into_model(
                model, cfg.init_from, model_cfg=prep.model_cfg, tp_rank=groups.tp_rank, tp_size=groups.tp
            )
        except (ValueError, FileNotFoundError) as e:  # mismatch errors name the tensor / file
            raise TrainSetupError(f"init_from {cfg.init_from}: {e}") from None
        if groups.rank == 0:
            print(f"[hbp] initial weights from {cfg.init_from}", flush=True)
    elif cfg.init_from is not None and groups.rank == 0:
        print(f"[hbp] resuming: init_from {cfg.init_from} not loaded (the checkpoint wins)", flush=True)
    return model


def wrap_ddp_and_optimizer(model, oc: OptimizerConfig, *, bf16: bool, dtype: torch.dtype):
    """Megatron DDP (fp32 gradient buffer) and Megatron Adam around ``model``, as training uses them.

    Returns ``(ddp_model, optimizer)``. Memory per parameter on top of the weights: 4 B of fp32
    gradient buffer, 8 B of Adam moments and, in bf16, 4 B of fp32 main weights (the
    distributed optimizer shards the last two over the data-parallel ranks).
    """
    tconfig = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=oc.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)
    tconfig.no_sync_func = model.no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer="adam",
            lr=oc.lr,
            min_lr=oc.min_lr,
            weight_decay=oc.weight_decay,
            adam_beta1=oc.adam_beta1,
            adam_beta2=oc.adam_beta2,
            adam_eps=oc.adam_eps,
            clip_grad=oc.clip_grad,
            bf16=bf16,
            params_dtype=dtype,
            use_distributed_optimizer=oc.use_distributed_optimizer,
        ),
        [model],
    )
    return model, optimizer


def build_scheduler(optimizer, oc: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Linear warmup then ``oc.decay_style`` decay over ``total_steps`` (constant weight decay).

    The schedule always spans the whole plan, so stopping early (max_steps) and resuming
    follow exactly the same learning rates as one uninterrupted run.
    """
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=oc.lr,
        min_lr=oc.min_lr,
        lr_warmup_steps=oc.warmup_steps,
        lr_decay_steps=max(total_steps, oc.warmup_steps + 1),
        lr_decay_style=oc.decay_style,
        start_wd=oc.weight_decay,
        end_wd=oc.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def checkpoint_meta(cfg: TrainConfig, prep: Prepared, groups: ParallelGroups) -> dict:
    """``meta.json`` of this run's checkpoints (what a resume must agree with)."""
    return {
        "plan_hash": ckpt.plan_hash(prep.plan),
        "model": to_dict(prep.model_cfg),
        "tp": groups.tp,
        "pp": groups.pp,
        "world_size": groups.world,
        "loss_normalization": cfg.loss_normalization,
        "plan_path": str(cfg.plan.path),
        "distributed_optimizer": cfg.optimizer.use_distributed_optimizer,
        "cp_backend": cfg.cp_backend,  # as configured
        "cp_impl": prep.cp_impl,  # what ran: ulysses / allgather
    }


def resume(cfg: TrainConfig, groups: ParallelGroups, model, optimizer, scheduler, meta: dict) -> int:
    """Load ``checkpoint.load`` when set; returns the first plan step to run (0 without one)."""
    if not cfg.checkpoint.load:
        return 0
    try:
        start = ckpt.load_checkpoint(
            cfg.checkpoint.load, rank=groups.rank, model=model, optimizer=optimizer, scheduler=scheduler,
            current_meta=meta, distributed_optimizer=cfg.optimizer.use_distributed_optimizer, groups=groups,
        )  # fmt: skip
    except (ckpt.CheckpointMismatchError, ckpt.CheckpointCorruptError, ckpt.UnsafeCheckpointError,
            FileNotFoundError) as e:  # fmt: skip
        raise TrainSetupError(str(e)) from None
    if groups.rank == 0:
        print(f"[hbp] resumed from {cfg.checkpoint.load}: next plan step {start}", flush=True)
    return start


def save(cfg: TrainConfig, done: int, groups: ParallelGroups, model, optimizer, scheduler, meta: dict):
    """Save the state after ``done`` plan steps to ``checkpoint.dir`` (a collective); returns the folder."""
    path = ckpt.save_checkpoint(
        cfg.checkpoint.dir, done, rank=groups.rank, model=model, optimizer=optimizer, scheduler=scheduler,
        meta=meta, distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        keep_last=cfg.checkpoint.keep_last, groups=groups,
        fmt=cfg.checkpoint.format, async_save=cfg.checkpoint.async_save,
    )  # fmt: skip
    if groups.rank == 0:
        print(f"[hbp] {'saving' if cfg.checkpoint.async_save else 'saved'} checkpoint {path}", flush=True)
    return path
