"""One training step's pieces: Megatron DDP + optimizer around the model, and the
per-data-rank view of a world all-gather.
"""

from __future__ import annotations

import torch

from megatron_hbp.mcore.config import OptimizerConfig

# ----------------------------------------------------------------------------- training


def wrap_ddp_and_optimizer(model, oc: OptimizerConfig, *, bf16: bool, dtype: torch.dtype):
    """Megatron DDP (fp32 gradient buffer) and Megatron Adam around ``model``, as training uses them.

    Returns ``(ddp_model, optimizer)``. Memory per parameter on top of the weights: 4 B of fp32
    gradient buffer, 8 B of Adam moments and, in bf16, 4 B of fp32 main weights (the
    distributed optimizer shards the last two over the data-parallel ranks).
    """
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

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


def gathered_unique(gathered: list[torch.Tensor], tp: int, pp: int) -> list[list[float]]:
    """One entry per data x context rank from a world all-gather (TP/PP copies dropped).

    Megatron's default order puts TP innermost, then DP, then PP: the ranks with tp_rank 0
    of the first pipeline stage are ``0, tp, 2·tp, ...`` up to ``dp·tp``.
    """
    world = len(gathered)
    dp = world // (tp * pp)
    return [gathered[i * tp].tolist() for i in range(dp)]
