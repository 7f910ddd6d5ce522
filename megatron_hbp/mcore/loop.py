"""The training loop (:func:`run`)."""

from __future__ import annotations

import functools
import gc
import random
import time

import numpy as np
import torch

from megatron_hbp.configio import to_dict
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.launch import TrainSetupError, _use_bf16, init_distributed
from megatron_hbp.mcore.preemption import Preempted, PreemptionWatcher
from megatron_hbp.mcore.preflight import _check_first_samples, preflight
from megatron_hbp.mcore.step import gathered_unique, wrap_ddp_and_optimizer


def run(cfg: TrainConfig, *, on_grads=None) -> list[dict]:
    """Train according to ``cfg``; returns the metric records (on the logging rank).

    ``on_grads(step_index, model)``, if given, is called after the gradients of a step are
    reduced and normalised (``param.main_grad``) and before the optimizer uses them (tests).
    """
    # The model and optimizer of an earlier run() in this process are cyclic garbage (Megatron's
    # hooks refer back to the model): free them before this run allocates. Python's collector
    # alone may not have run, and on a GPU that memory (18 B/param) can make this run OOM.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    rank, world, device = init_distributed()
    prep = preflight(cfg, world, rank)

    from megatron.core import parallel_state
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_hbp.data.token_files import open_sft_dataset
    from megatron_hbp.mcore import checkpoint as ckpt
    from megatron_hbp.mcore.batch import to_model_inputs
    from megatron_hbp.mcore.data import make_loader, rank_work_items
    from megatron_hbp.mcore.loss import forward_step, reduce_reports, resolve_loss_impl
    from megatron_hbp.mcore.metrics import MetricsLogger, model_flops, peak_tflops, rank_attention_pairs
    from megatron_hbp.mcore.model import build_model, select_layer_kernels, set_recompute

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    plan = prep.plan
    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() != tp
        or parallel_state.get_pipeline_model_parallel_world_size() != pp
    ):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)  # noqa: NPY002 - seeds third-party code using the global RNG
    random.seed(cfg.seed)  # so is Python's (every RNG a checkpoint restores starts from the seed)
    dp_rank = parallel_state.get_data_parallel_rank()
    degrees = sorted({int(g.cp) for g in plan.groups})
    cp_groups = None
    if any(c > 1 for c in degrees):
        from megatron_hbp.mcore.cp_seam import build_cp_groups

        cp_groups = build_cp_groups(degrees, tp=tp, pp=pp)

    bf16 = _use_bf16(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        layer_kernels = select_layer_kernels(cfg.layer_kernels)
    except ValueError as e:
        raise TrainSetupError(f"layer_kernels: {e}") from None
    model = build_model(
        prep.model_cfg,
        tp=tp,
        pp=pp,
        dtype=dtype,
        attention_backend=cfg.attention_backend,
        layer_kernels=layer_kernels,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if cfg.init_from is not None and not cfg.checkpoint.load:
        from megatron_hbp.convert import load_pretrained_into_model

        try:
            load_pretrained_into_model(
                model, cfg.init_from, model_cfg=prep.model_cfg,
                tp_rank=parallel_state.get_tensor_model_parallel_rank(), tp_size=tp,
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:  # mismatch errors name the tensor / file
            raise TrainSetupError(f"init_from {cfg.init_from}: {e}") from None
        if rank == 0:
            print(f"[hbp] initial weights from {cfg.init_from}", flush=True)
    elif cfg.init_from is not None and rank == 0:
        print(f"[hbp] resuming: init_from {cfg.init_from} not loaded (the checkpoint wins)", flush=True)
    model, optimizer = wrap_ddp_and_optimizer(model, cfg.optimizer, bf16=bf16, dtype=dtype)
    oc = cfg.optimizer
    # The schedule always spans the whole plan, so stopping early (max_steps) and resuming
    # follow exactly the same learning rates as one uninterrupted run.
    total_steps = plan.num_steps
    scheduler = OptimizerParamScheduler(
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

    meta = {
        "plan_hash": ckpt.plan_hash(plan),
        "model": to_dict(prep.model_cfg),
        "tp": tp,
        "pp": pp,
        "world_size": world,
        "loss_normalization": cfg.loss_normalization,
        "plan_path": str(cfg.plan.path),
        "distributed_optimizer": oc.use_distributed_optimizer,
        "cp_backend": cfg.cp_backend,  # as configured
        "cp_impl": prep.cp_impl,  # what ran: ulysses / allgather
    }
    start = 0
    if cfg.checkpoint.load:
        try:
            start = ckpt.load_checkpoint(
                cfg.checkpoint.load, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                current_meta=meta, distributed_optimizer=oc.use_distributed_optimizer,
            )  # fmt: skip
        except (ckpt.CheckpointMismatchError, ckpt.CheckpointCorruptError, ckpt.UnsafeCheckpointError,
                FileNotFoundError) as e:  # fmt: skip
            raise TrainSetupError(str(e)) from None
        if rank == 0:
            print(f"[hbp] resumed from {cfg.checkpoint.load}: next plan step {start}", flush=True)
    end = plan.num_steps if cfg.max_steps is None else min(plan.num_steps, cfg.max_steps)

    dataset = open_sft_dataset(  # token files by mmap when they exist, else the JSONL
        prep.sample_info if not isinstance(cfg.data.sample_info, str) else cfg.data.sample_info
    )
    if rank == 0:
        src = getattr(dataset, "paths", None)
        print(
            f"[hbp] samples from {src.tokens + '.bin (mmap)' if src else 'the JSONL (tokenised on access)'}",
            flush=True,
        )
    # The padding id never matters, so 0 is used: padding sits after a document's real tokens inside
    # its own (causal) span, so no real token attends to it; it is never a target (label 0, loss
    # weight 0), hence its logits, and the embedding row it reads, get exactly zero gradient; a
    # padding-only micro-batch has no loss tokens at all.
    pad_id = 0
    _check_first_samples(prep, dataset, dp_rank, start)
    items = rank_work_items(plan, dp_rank, start, end, dp_size=prep.dp_size)
    loader = make_loader(
        items,
        dataset,
        pad_id=pad_id,
        loss_normalization=cfg.loss_normalization,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
    )
    batches_it = iter(loader)

    is_logger = rank == world - 1 if pp > 1 else rank == 0
    logger = MetricsLogger(
        cfg.metrics_file, enabled=is_logger, tensorboard_dir=cfg.tensorboard_dir, resume=start > 0
    )
    fwd_bwd = get_forward_backward_func()
    loss_impl = resolve_loss_impl(cfg.loss_impl, cfg.loss_normalization)
    kernel_backend = "triton" if layer_kernels == "triton" else "auto"  # of the fused loss kernel
    step_fn = functools.partial(forward_step, impl=loss_impl, kernel_backend=kernel_backend)
    peak = peak_tflops()
    records = []
    if rank == 0:
        print(
            f"[hbp] training {prep.model_cfg.name} ({prep.model_cfg.num_parameters() / 1e6:.1f}M params) on {world} "
            f"ranks (tp={tp}, pp={pp}, dp x cp={prep.dp_size}), {'bf16' if bf16 else 'fp32'}, loss {loss_impl}, layer kernels {layer_kernels}, plan steps "
            f"{start}..{end - 1} of {plan.num_steps}, CP degrees {degrees}",
            flush=True,
        )
        if any(c > 1 for c in degrees):
            print(
                f"[hbp] CP attention: {prep.cp_impl} (cp_backend {cfg.cp_backend}: {prep.cp_impl_why})",
                flush=True,
            )
    model.train()
    preempt = PreemptionWatcher().install()  # SIGTERM / SIGUSR1: finish the step, save, stop
    for s in range(start, end):
        step = plan.step(s)
        set_recompute(model, int(step.recompute_layers))
        cp = int(step.cp)
        cp_group = cp_groups.cp_group(cp) if cp > 1 else None
        n_mb = int(step.micro_batches_per_replica) * (plan.world_size // prep.dp_size)  # replicas per rank
        host_batches = [next(batches_it) for _ in range(n_mb)]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = iter([to_model_inputs(b, device, cp_group, prep.cp_impl) for b in host_batches])
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = fwd_bwd(
            forward_step_func=step_fn,
            data_iterator=inputs,
            model=[model],
            num_microbatches=n_mb,
            seq_length=max(int(b.tokens.numel()) for b in host_batches),
            micro_batch_size=1,
            forward_only=False,
        )
        if on_grads is not None:
            on_grads(s, model)
        lr_applied = float(optimizer.param_groups[0]["lr"])  # the scheduler set it for this step
        ok, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        loss, denom = reduce_reports(reports, device, tp)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        local_loss_tokens = sum(b.local_loss_tokens for b in host_batches)
        pairs = rank_attention_pairs(host_batches, prep.cp_impl)
        stats = torch.tensor([local_loss_tokens, pairs], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        torch.distributed.all_gather(gathered, stats)
        loss_tokens_total = int(sum(x[0] for x in gathered_unique(gathered, tp, pp)))
        if cfg.check_loss_tokens and loss_tokens_total != int(step.loss_tokens):
            raise RuntimeError(
                f"plan step {s}: the micro-batches hold {loss_tokens_total} loss tokens but the plan says "
                f"{int(step.loss_tokens)}; the plan or sample info does not match the data (rebuild both)"
            )
        if (
            cfg.loss_normalization == "step_token_mean"
            and cfg.check_loss_tokens
            and int(round(denom)) != int(step.loss_tokens)
        ):
            raise RuntimeError(
                f"plan step {s}: Megatron's all-reduced token count {denom} differs from the plan's "
                f"{int(step.loss_tokens)}"
            )
        pairs_per_rank = [float(x[1]) for x in gathered_unique(gathered, tp, pp)]
        mean_pairs = float(np.mean(pairs_per_rank)) if pairs_per_rank else 0.0
        tokens = int(step.num_tokens)
        comm = 0
        if cp > 1:
            from megatron_hbp.cp import cp_comm_bytes, ulysses_comm_bytes

            mc = prep.model_cfg
            for b in host_batches:
                kw = dict(
                    num_layers=mc.num_layers // pp, recompute_layers=int(step.recompute_layers),
                    dtype_bytes=2 if bf16 else 4,
                )  # fmt: skip
                n_tok, hkv = int(sum(b.padded_lengths)), mc.num_query_groups // tp
                if prep.cp_impl == "ulysses":
                    comm += ulysses_comm_bytes(
                        n_tok, mc.num_attention_heads // tp, hkv, mc.head_dim, cp, **kw
                    )
                else:
                    comm += cp_comm_bytes(n_tok, hkv, mc.head_dim, cp, **kw)
        rec = {
            "step": s,
            "group": int(step.group),
            "cp": cp,
            "recompute_layers": int(step.recompute_layers),
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr_applied,
            "tokens": tokens,
            "loss_tokens": int(step.loss_tokens),
            "micro_batches": n_mb,
            "step_time_s": dt,
            "tokens_per_s": tokens / dt if dt > 0 else 0.0,
            "attn_pairs_per_rank": pairs_per_rank,
            "attn_imbalance": (max(pairs_per_rank) / mean_pairs) if mean_pairs > 0 else 1.0,
            "update_ok": bool(ok),
            "cp_comm_bytes_per_rank": comm,
            "cp_backend": prep.cp_impl if cp > 1 else "none",
        }
        if torch.cuda.is_available():
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if peak:
                flops = model_flops(prep.model_cfg, tokens, sum(pairs_per_rank))
                rec["mfu"] = flops / (dt * peak * 1e12 * world)
        records.append(rec)
        logger.log(rec, console=(s - start) % cfg.log_interval == 0 or s == end - 1)

        done = s + 1
        save_now = cfg.checkpoint.dir and (
            (cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0)
            or (cfg.checkpoint.save_at_end and done == end)
        )
        stop = preempt.requested(device)
        path = None
        if save_now or (stop and cfg.checkpoint.dir):
            path = ckpt.save_checkpoint(
                cfg.checkpoint.dir, done, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                meta=meta, distributed_optimizer=oc.use_distributed_optimizer, keep_last=cfg.checkpoint.keep_last,
            )  # fmt: skip
            if rank == 0:
                print(f"[hbp] saved checkpoint {path}", flush=True)
        if stop:
            preempt.close()
            logger.close()
            raise Preempted(done, path, preempt.signame)
    preempt.close()
    logger.close()
    return records
