"""Everything checked before the model is built (:func:`preflight`): model config, world size vs
tp x pp, sample info and plan (built on rank 0 when configured), plan vs launch and sample info,
CP degrees and backend, the memory check; and the first samples of a rank (:func:`_check_first_samples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hbp import load_plan
from megatron_hbp.configio import ConfigError
from megatron_hbp.data import load_sample_info
from megatron_hbp.data.token_files import TokenFileError, check_token_files
from megatron_hbp.mcore import preflight_checks as checks
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.cp_seam import require_cp, resolve_cp_impl
from megatron_hbp.mcore.data import rank_work_items
from megatron_hbp.mcore.inputs import _build_plan, _build_sample_info, check_init_from
from megatron_hbp.mcore.launch import TrainSetupError, _all_ok, _use_bf16
from megatron_hbp.mcore.loss import resolve_loss_impl
from megatron_hbp.mcore.memory import (
    _device_memory_limit,
    _rmsnorm_fused,
    check_memory,
    hardware_for_device,
    trainer_cost_model,
)
from megatron_hbp.model_config import ModelConfig, load_model_config
from megatron_hbp.planner import PlanMismatchError


@dataclass
class Prepared:
    model_cfg: ModelConfig
    sample_info: object
    plan: object
    dp_size: int
    cp_impl: str = "ulysses"
    """CP attention of CP > 1 steps (``ulysses`` / ``allgather``), resolved from ``cp_backend``."""
    cp_impl_why: str = "auto"


def preflight(cfg: TrainConfig, world: int, rank: int) -> Prepared:
    """Every check that does not need the model; builds sample info / plan when configured."""
    warns = checks.check_device_settings(cfg, on_cuda=torch.cuda.is_available())  # CPU-only mistakes
    for warning in warns if rank == 0 else []:
        print(f"[hbp] WARNING {warning}", flush=True)
    model_cfg, dp_size = _check_model_and_launch(cfg, world)
    _prepare_inputs(cfg, rank, dp_size)
    info, plan = _load_checked_inputs(cfg, world, rank, dp_size)
    degrees = sorted({int(g.cp) for g in plan.groups})
    for c in degrees:
        if dp_size % c:
            raise TrainSetupError(
                f"plan uses cp={c}, which does not divide the {dp_size} data x context ranks"
            )
    cp_impl, cp_why = _resolve_cp(cfg, model_cfg, degrees)
    for warning in _memory_warnings(cfg, model_cfg, plan, world, cp_impl):
        if rank == 0:
            print(f"[hbp] WARNING {warning}", flush=True)
    return Prepared(model_cfg, info, plan, dp_size, cp_impl, cp_why)


def _check_model_and_launch(cfg: TrainConfig, world: int) -> tuple[ModelConfig, int]:
    """The model config (and its ``init_from`` weights) against tp / pp and the world size;
    returns ``(model config, data x context ranks)``."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    try:
        model_cfg = load_model_config(cfg.model_source)
    except ConfigError as e:
        raise TrainSetupError(str(e)) from None
    check_init_from(cfg, model_cfg)
    if world % (tp * pp):
        raise TrainSetupError(
            f"world size {world} is not divisible by tp*pp = {tp}*{pp}; launch a multiple of {tp * pp}"
        )
    dp_size = world // (tp * pp)
    if model_cfg.num_attention_heads % tp or model_cfg.num_query_groups % tp:
        raise TrainSetupError(
            f"model '{model_cfg.name}': {model_cfg.num_attention_heads} heads / {model_cfg.num_query_groups} "
            f"query groups are not divisible by tp={tp}; choose tp dividing {model_cfg.num_query_groups}"
        )
    return model_cfg, dp_size


def _prepare_inputs(cfg: TrainConfig, rank: int, dp_size: int) -> None:
    """Build missing inputs on rank 0 only; the other ranks learn the outcome."""
    error = None
    if rank == 0:
        try:
            if not Path(cfg.data.sample_info).exists():
                if not cfg.data.build_if_missing:
                    raise TrainSetupError(
                        f"sample info file not found: {cfg.data.sample_info}; run tools/preprocess_lengths.py "
                        "or set data.build_if_missing: true with data.paths"
                    )
                _build_sample_info(cfg)
            if not Path(cfg.plan.path).exists():
                _build_plan(cfg, dp_size)
        except Exception as e:  # reported on every rank below
            error = e
    if not _all_ok(error is None):
        if error is not None:
            raise error
        raise TrainSetupError("rank 0 failed to prepare the sample info / plan (see its error)")


def _load_checked_inputs(cfg: TrainConfig, world: int, rank: int, dp_size: int):
    """``(sample info, plan)``: the data files exist, the plan fits this launch and this sample info."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    info = load_sample_info(cfg.data.sample_info)
    try:  # token files, when there are any, must match the sample info; then no JSONL is read
        has_tokens = check_token_files(info) is not None
    except TokenFileError as e:
        raise TrainSetupError(str(e)) from None
    for f in [] if has_tokens else info.files:
        if not Path(f).exists():
            raise TrainSetupError(
                f"data file {f} listed in {cfg.data.sample_info} does not exist; restore it or rebuild the sample info"
            )
    plan = load_plan(cfg.plan.path)
    if plan.world_size != dp_size and not _accumulates_replicas(plan, dp_size, rank):
        raise TrainSetupError(
            f"plan {cfg.plan.path} is for {plan.world_size} data x context ranks but this launch has {dp_size} "
            f"({world} processes / (tp={tp} * pp={pp})); launch {plan.world_size * tp * pp} processes"
            f"{_fewer_ranks_hint(plan, tp * pp)} or re-plan with world_size: {dp_size}"
        )
    if plan.fingerprint is not None and plan.fingerprint != info.fingerprint:
        raise TrainSetupError(
            f"plan {cfg.plan.path} was built from another sample info (fingerprint {plan.fingerprint[:12]} vs "
            f"{info.fingerprint[:12]} of {cfg.data.sample_info}); rebuild the plan"
        )
    # A plan built from bare lengths (tools/plan.py --lengths) has no fingerprint: its sample count and
    # lengths digest are then the only guard against training on other samples than it packed.
    try:
        plan.check_lengths(info.lengths)
    except PlanMismatchError as e:
        raise TrainSetupError(
            f"plan {cfg.plan.path} does not match sample info {cfg.data.sample_info}: {e} "
            f"(e.g. tools/plan.py --sample-info {cfg.data.sample_info})"
        ) from None
    return info, plan


def _resolve_cp(cfg: TrainConfig, model_cfg: ModelConfig, degrees: list[int]) -> tuple[str, str]:
    """``(cp_impl, why)``: the CP attention of CP > 1 steps, from ``cp_backend`` and the heads."""
    # deferred: mcore.attention imports megatron.core, which the launch imports only after
    # init_distributed (other ranks then keep its import warnings quiet)
    from megatron_hbp.mcore.attention import _te_available

    try:
        require_cp(degrees)
        return resolve_cp_impl(
            cfg.cp_backend, num_heads=model_cfg.num_attention_heads, num_kv_heads=model_cfg.num_query_groups,
            tp=cfg.parallel.tp, degrees=degrees, te_available=_te_available(),
        )  # fmt: skip
    except (RuntimeError, ValueError) as e:
        raise TrainSetupError(str(e)) from None


def _memory_warnings(cfg: TrainConfig, model_cfg: ModelConfig, plan, world: int, cp_impl: str) -> list[str]:
    """The OOM pre-flight (``memory.check_memory``) against the device memory or ``memory_limit_gb``
    (skipped on CPU without a limit): raises for a refused group, returns the warnings."""
    limit = _device_memory_limit(cfg)
    if limit is None:
        return []
    # deferred: imports megatron.core (see _resolve_cp)
    from megatron_hbp.mcore.attention import select_backend

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    bf16 = _use_bf16(cfg)
    on_cuda = torch.cuda.is_available()
    try:
        backend = select_backend(cfg.attention_backend, dtype=torch.bfloat16 if bf16 else torch.float32)
    except ValueError as e:
        raise TrainSetupError(str(e)) from None
    cm = trainer_cost_model(
        model_cfg, world=world, tp=tp, pp=pp, bf16=bf16, attention_backend=backend,
        fused_loss=resolve_loss_impl(cfg.loss_impl, cfg.loss_normalization) == "fused",
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer, rmsnorm_fused=_rmsnorm_fused(),
        hardware=hardware_for_device(
            torch.cuda.get_device_name(torch.cuda.current_device()) if on_cuda else "cpu", limit
        ),
        # the reserve is CUDA context, NCCL buffers and allocator fragmentation: none on CPU
        memory_reserve_gib=None if on_cuda else 0.0, cp_impl=cp_impl,
    )  # fmt: skip
    return check_memory(cm, plan, limit, pp=pp)


def _fewer_dp(plan) -> list[int]:
    """Data x context rank counts below the plan's that can run it by accumulating replicas."""
    degrees = {int(g.cp) for g in plan.groups}
    w = plan.world_size
    return [d for d in range(1, w) if w % d == 0 and all(d % c == 0 for c in degrees)]


def _fewer_ranks_hint(plan, tp_pp: int) -> str:
    ok = _fewer_dp(plan)[::-1]
    return (
        f" (or {', '.join(str(d * tp_pp) for d in ok)}: fewer ranks accumulate the missing replicas)"
        if ok
        else ""
    )


def _accumulates_replicas(plan, dp_size: int, rank: int) -> bool:
    """Whether this launch runs the plan with fewer data x context ranks (each rank runs
    ``plan.world_size / dp_size`` replicas per step; plan, loss normaliser and steps unchanged)."""
    if dp_size not in _fewer_dp(plan):
        return False
    if rank == 0:
        print(
            f"[hbp] plan for {plan.world_size} data x context ranks on {dp_size}: each rank runs the micro-batches "
            f"of {plan.world_size // dp_size} replicas per step (gradient accumulation)",
            flush=True,
        )
    return True


def _check_first_samples(prep: Prepared, dataset, dp_rank: int, start: int) -> None:
    """Read the first step's samples of this rank: a changed data file fails here, not mid-run."""
    if start >= prep.plan.num_steps:
        return
    for item in rank_work_items(prep.plan, dp_rank, start, start + 1, dp_size=prep.dp_size):
        for idx, n in zip(item.sample_indices.tolist(), item.lengths.tolist()):
            try:
                got = len(dataset[idx].input_ids)
            except Exception as e:
                raise TrainSetupError(f"reading sample {idx}: {e}") from None
            if got != n:
                raise TrainSetupError(
                    f"sample {idx}: tokenised length {got} differs from the plan's {n}; the data changed after "
                    "preprocessing: rebuild the sample info and the plan"
                )
