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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_hbp.configio import ConfigError, to_dict
from megatron_hbp.mcore import preflight_checks as checks
from megatron_hbp.mcore.config import OptimizerConfig, TrainConfig, load_train_config
from megatron_hbp.mcore.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatcher
from megatron_hbp.model_config import ModelConfig, load_model_config


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
        from megatron_hbp.mcore.shim import install_cpu_shim

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


# ----------------------------------------------------------------------------- pre-flight


@dataclass
class Prepared:
    model_cfg: ModelConfig
    sample_info: object
    plan: object
    dp_size: int
    cp_impl: str = "ulysses"
    """CP attention of CP > 1 steps (``ulysses`` / ``allgather``), resolved from ``cp_backend``."""
    cp_impl_why: str = "auto"


# Markers of the Jinja chat templates that ship with HF models -> our built-in template with
# the same rendering (megatron_hbp.data.templates); checked in this order.
_JINJA_MARKERS = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("[INST]", "mistral"),
)


def init_dir_files(init_from: str | Path) -> Path:
    """Folder of ``init_from`` holding its tokenizer files (``tokenizer/`` in a converted one)."""
    d = Path(init_from)
    if (d / "convert_meta.json").is_file() and (d / "tokenizer").is_dir():
        return d / "tokenizer"
    return d


def template_from_jinja(jinja: str) -> str | None:
    """The built-in chat template whose markers appear in a HF Jinja chat template, or None."""
    for marker, name in _JINJA_MARKERS:
        if marker in jinja:
            return name
    return None


def resolve_tokenizer_and_template(cfg: TrainConfig) -> tuple[str, str]:
    """``(tokenizer path, template name)`` for building the sample info.

    Explicit ``data.tokenizer`` / ``data.template`` win; otherwise, with ``init_from``, the
    tokenizer shipped in it (``tokenizer.json`` / ``tokenizer.model``) and the built-in template
    matching its chat template; otherwise the default tokenizer and ``llama3``.
    """
    from megatron_hbp import data as hdata

    tokenizer, template = cfg.data.tokenizer, cfg.data.template
    if cfg.init_from is not None and (tokenizer is None or template is None):
        from megatron_hbp.convert import find_hf_tokenizer

        src = init_dir_files(cfg.init_from)
        tok, jinja = find_hf_tokenizer(src)
        if tokenizer is None:
            if tok is None:
                raise TrainSetupError(
                    f"init_from {cfg.init_from}: no tokenizer.json or tokenizer.model in {src}; "
                    "set data.tokenizer"
                )
            tokenizer = str(tok)
        if template is None and jinja is not None:
            template = template_from_jinja(jinja)
            if template is None:
                raise TrainSetupError(
                    f"init_from {cfg.init_from}: its chat template matches none of the built-in ones "
                    "(llama3, chatml, mistral); set data.template"
                )
            print(f"[hbp] chat template of {src}: using the built-in '{template}' template", flush=True)
    return tokenizer or str(hdata.default_tokenizer_path()), template or "llama3"


def _build_sample_info(cfg: TrainConfig) -> None:
    from megatron_hbp import data as hdata

    paths = list(cfg.data.paths)
    if cfg.data.demo:
        from megatron_hbp.data.demo import ensure_demo_data

        paths = [str(ensure_demo_data())]
    if not paths:
        raise TrainSetupError(
            f"sample info {cfg.data.sample_info} is missing and data.paths is empty: run "
            "tools/preprocess_lengths.py, or set data.paths (or data.demo: true) with build_if_missing: true"
        )
    tokenizer, template = resolve_tokenizer_and_template(cfg)
    print(
        f"[hbp] building sample info {cfg.data.sample_info} from {paths} (tokenizer {tokenizer})", flush=True
    )
    hdata.preprocess(
        paths, cfg.data.sample_info, tokenizer=tokenizer, template=template,
        max_length=cfg.data.max_length, workers=max(1, cfg.data.num_workers),
    )  # fmt: skip


def check_init_from(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse, before training, initial weights that cannot load into this model."""
    if cfg.init_from is None or cfg.checkpoint.load:
        return
    from megatron_hbp.convert.hf_config import config_differences

    d = Path(cfg.init_from)
    if cfg.parallel.pp > 1:
        raise TrainSetupError("init_from does not support pipeline parallelism (pp > 1); use pp: 1")
    if not d.is_dir():
        raise TrainSetupError(f"init_from {d}: folder not found")
    meta = d / "convert_meta.json"
    if meta.is_file():
        src = json.loads(meta.read_text())
        if int(src.get("tp", -1)) != cfg.parallel.tp:
            raise TrainSetupError(
                f"init_from {d} was converted for tp={src.get('tp')} but parallel.tp={cfg.parallel.tp}; convert "
                f"again with --tp {cfg.parallel.tp}, or give the Hugging Face folder (converted on the fly)"
            )
        try:
            src_cfg = load_model_config(d)
        except ConfigError as e:
            raise TrainSetupError(str(e)) from None
    elif (d / "config.json").is_file():
        if not any(d.glob("*.safetensors")):
            raise TrainSetupError(
                f"init_from {d}: config.json but no *.safetensors weights (only safetensors checkpoints are read)"
            )
        try:
            src_cfg = load_model_config(d)
        except ConfigError as e:
            raise TrainSetupError(str(e)) from None
    else:
        raise TrainSetupError(
            f"init_from {d}: neither a Hugging Face model folder (config.json + *.safetensors) nor a folder "
            "from tools/convert_checkpoint.py hf-to-megatron (convert_meta.json)"
        )
    diff = config_differences(model_cfg, src_cfg)
    if diff:
        raise TrainSetupError(
            f"model '{cfg.model}' disagrees with init_from {d}: {'; '.join(diff)}. Leave model unset (or set it "
            "to the init_from folder) to take the shapes from the checkpoint"
        )


def _build_plan(cfg: TrainConfig, dp_size: int) -> None:
    import yaml

    from megatron_hbp.configio import from_dict
    from megatron_hbp.data import load_sample_info
    from megatron_hbp.planner import PlanConfig, build_plan

    if not cfg.plan.config:
        raise TrainSetupError(
            f"plan {cfg.plan.path} is missing and plan.config is not set: run tools/plan.py first"
        )
    if not Path(cfg.plan.config).is_file():
        raise TrainSetupError(f"plan config {cfg.plan.config} not found")
    data = yaml.safe_load(Path(cfg.plan.config).read_text()) or {}
    data.update(cfg.plan.overrides)
    if cfg.plan.world_size is not None:
        data["world_size"] = cfg.plan.world_size
    pcfg = from_dict(PlanConfig, data, where=str(cfg.plan.config))
    info = load_sample_info(cfg.data.sample_info)
    print(
        f"[hbp] building plan {cfg.plan.path} from {cfg.plan.config} (overrides: {cfg.plan.overrides})",
        flush=True,
    )
    plan = build_plan(info.lengths, info.loss_tokens, pcfg, fingerprint=info.fingerprint)
    target = Path(cfg.plan.path)
    out = plan.save(target if target.suffix == ".npz" else target / "plan.npz")
    try:
        from megatron_hbp.planner.report import report_markdown, write_report

        rep = write_report(plan, out.parent, title=f"Plan report: {out}")
        print(report_markdown(rep, title=f"Plan report: {out}"), flush=True)
    except Exception as e:  # the report is informational; training does not depend on it
        print(f"[hbp] (plan report unavailable: {e})", flush=True)


def trainer_cost_model(
    model_cfg: ModelConfig,
    *,
    world: int,
    tp: int = 1,
    pp: int = 1,
    bf16: bool = True,
    attention_backend: str = "varlen",
    fused_loss: bool = True,
    distributed_optimizer: bool = False,
    rmsnorm_fused: bool = False,
    hardware=None,
    memory_reserve_gib: float | None = None,
    cp_impl: str = "ulysses",
):
    """The ``megatron_hbp.costmodel.CostModel`` of the run this trainer does (what the pre-flight
    OOM check and ``tools/select_groups.py`` should agree on).

    Args:
        model_cfg: the model; with ``pp > 1`` one pipeline stage is modelled (``ceil(L / pp)``
            layers plus embedding and output layer: the bigger of the first and last stage).
        world: processes in the job (tp x pp x DP x CP).
        attention_backend: the *resolved* backend (``te``, ``varlen`` or ``sdpa``).
        fused_loss: ``loss_impl`` resolved to ``fused`` (chunked linear + CE, no logits).
        rmsnorm_fused: apex/TE RMSNorm in Megatron's local spec (else ``torch.nn.RMSNorm``).
        hardware: ``HardwareProfile`` or profile name (memory() does not read it; it names the GPU).
        memory_reserve_gib: ``TrainingSetup.memory_reserve_gib`` (None: the cost model's default).
        cp_impl: the resolved ``cp_backend`` of CP > 1 steps (``ulysses`` or ``allgather``).

    The trainer's code paths (``megatron_hbp.mcore``): ``varlen`` repeats K/V to all heads before the
    flash kernel (``attention_expand_kv``), ``te`` does not; ``sdpa`` is the math backend per
    document (needs the packs' sum of squared lengths); RoPE is ``attention.apply_rope`` (unfused);
    the MLP runs with ``bias_activation_fusion=False`` (unfused SwiGLU); CP > 1 steps go through
    ``megatron_hbp.cp`` (``cp_impl``: Ulysses or all-gather); activations bf16 or fp32.
    """
    from dataclasses import replace as _replace

    from megatron_hbp.costmodel import CostModel, TrainingSetup

    layers = -(-model_cfg.num_layers // pp)
    stage = model_cfg if pp == 1 else _replace(model_cfg, num_layers=layers)
    kw = {} if memory_reserve_gib is None else {"memory_reserve_gib": memory_reserve_gib}
    setup = TrainingSetup(
        tensor_parallel=tp,
        distributed_optimizer=distributed_optimizer,
        fused_loss=fused_loss,
        grad_bytes=4,  # main grads are fp32 (accumulate_allreduce_grads_in_fp32 with bf16; fp32 runs)
        activation_bytes=2 if bf16 else 4,
        attention_impl="math" if attention_backend == "sdpa" else "flash",
        attention_expand_kv=attention_backend == "varlen",
        rope_impl="unfused",
        swiglu_impl="unfused",
        rmsnorm_impl="fused" if rmsnorm_fused else "unfused",
        cp_impl=cp_impl,
        **kw,
    )
    # num_gpus / tp must be the DP x CP ranks the distributed optimizer shards over
    return CostModel(stage, hardware or "h100_sxm", num_gpus=world // pp, setup=setup)


def group_sum_sq_lengths(plan) -> np.ndarray:
    """``[G] float64``: per plan group, the largest sum of squared real document lengths of one pack
    (what the math attention backend keeps per layer is proportional to it)."""
    a = plan.arrays
    po = np.asarray(a["pack_offsets"], dtype=np.int64)
    lens = np.asarray(a["lengths"], dtype=np.float64)
    per_pack = np.bincount(
        np.repeat(np.arange(len(po) - 1), np.diff(po)), weights=lens**2, minlength=len(po) - 1
    )
    spo = np.asarray(a["step_pack_offsets"], dtype=np.int64)
    pack_group = np.repeat(np.asarray(a["step_group"], dtype=np.int64), np.diff(spo))
    out = np.zeros(len(plan.groups))
    np.maximum.at(out, pack_group, per_pack[: len(pack_group)])
    return out


def hardware_for_device(device_name: str, limit_bytes: float):
    """Cost-model hardware profile of a GPU called ``device_name`` (``torch.cuda.get_device_name``).

    A GPU with a profile (its ``device_names`` in the CUDA device name) gets it; any other GPU, or no GPU
    (``memory_limit_gb`` on CPU), gets a generic profile with the memory limit as its memory: its
    throughput fields are placeholders that ``CostModel.memory`` never reads, and borrowing the
    H100's would print an H100 banner (and H100 speeds to anyone reusing the model) for a GPU it is
    not."""
    from megatron_hbp.costmodel.hardware import HardwareProfile, hardware_for_device_name

    name = device_name
    known = hardware_for_device_name(name)  # the profiles' device_names (costmodel/hardware/*.yaml)
    if known is not None:
        return known
    return HardwareProfile(
        name=f"generic ({name})",
        bf16_dense_tflops=1.0,
        hbm_gb_per_s=1.0,
        memory_gib=limit_bytes / 2**30,
        nvlink_gb_per_s=1.0,
        internode_gb_per_s=1.0,
    )


def _rmsnorm_fused() -> bool:
    """Megatron's local layer spec uses apex FusedLayerNorm when apex is importable, else torch's."""
    try:
        from megatron.core.models.gpt import gpt_layer_specs

        return bool(getattr(gpt_layer_specs, "HAVE_APEX", False))
    except Exception:  # no megatron: the unfused norm keeps more, the safer estimate
        return False


@dataclass(frozen=True)
class GroupMemory:
    """The pre-flight's verdict on one plan group (``memory_verdicts``)."""

    group: int
    pack_length: int
    cp: int
    recompute_layers: int
    memory: object
    """``costmodel.MemoryBreakdown`` of the group's largest pack per rank."""
    verdict: str
    """``ok``, ``warning`` (only the estimated reserve tips it over) or ``refused``."""
    min_recompute_fit: int | None
    """Fewest recomputed layers that fit the limit (None: not even all layers)."""
    message: str
    """The one-line explanation for ``warning`` / ``refused`` ('' when ok)."""


def memory_verdicts(cm, plan, limit_bytes: float, *, pp: int = 1) -> list[GroupMemory]:
    """Every group's largest pack per rank (``pack_length / cp`` tokens, the group's recompute
    layers) against ``limit_bytes`` with ``cm.memory``: the rule of the trainer's pre-flight
    (``check_memory``) and of ``tools/preflight.py``. A group whose modelled tensors alone exceed the
    limit is ``refused``; one that only the reserve (CUDA context, NCCL buffers, fragmentation: an
    estimate calibrated on the paper's TE path) tips over is a ``warning``."""
    out: list[GroupMemory] = []
    sq = group_sum_sq_lengths(plan) if cm.setup.attention_impl == "math" else None
    L = cm.model.num_layers
    for i, g in enumerate(plan.groups):
        k = min(int(g.recompute_layers), L)
        math_cp = cm.setup.attention_impl == "math" and g.cp > 1
        # CP > 1 steps never run the math backend: megatron_hbp.cp's own kernels (modelled as flash;
        # Ulysses' CPU kernel saves what flash saves, unexpanded)
        expand = cm.setup.cp_impl != "ulysses"
        gcm = cm.with_setup(attention_impl="flash", attention_expand_kv=expand) if math_cp else cm
        s = None if gcm.setup.attention_impl != "math" else float(sq[i])
        m = gcm.memory(g.pack_length, g.cp, k, sum_sq_lengths=s)
        k_fit = gcm.min_recompute_layers(g.pack_length, g.cp, limit_bytes, sum_sq_lengths=s)
        verdict, msg = "ok", ""
        if m.total > limit_bytes:
            comps = ", ".join(
                f"{n} {getattr(m, n) / 2**30:.2f}"
                for n in ("weights", "gradients", "optimizer", "activations", "loss", "cp_buffers", "reserve")
            )
            hint = (
                f"recompute_layers >= {k_fit} fits"
                if k_fit is not None
                else "even recomputing every layer does not fit"
            )
            msg = (
                f"out-of-memory risk: group {i} (pack_length={g.pack_length} cp={g.cp} recompute_layers="
                f"{g.recompute_layers}) puts {g.pack_length // g.cp} tokens on a rank; model '{cm.model.name}'"
                f"{f' (one of {pp} pipeline stages)' if pp > 1 else ''} then needs {m.total / 2**30:.2f} GiB "
                f"by the cost model ({comps} GiB; CP attention {cm.setup.cp_impl}) but the device has "
                f"{limit_bytes / 2**30:.2f} GiB ({cm.hardware.name}). {hint}; raise cp or recompute_layers for "
                "that group, lower its pack_length, or raise tp (memory_limit_gb overrides the device memory)"
            )
            if m.total - m.reserve > limit_bytes:
                verdict = "refused"
            else:
                verdict = "warning"
                msg += f" [warning only: it fits without the {m.reserve / 2**30:.1f} GiB reserve]"
        out.append(
            GroupMemory(i, int(g.pack_length), int(g.cp), int(g.recompute_layers), m, verdict, k_fit, msg)
        )
    return out


def check_memory(cm, plan, limit_bytes: float, *, pp: int = 1) -> list[str]:
    """The trainer's OOM pre-flight (:func:`memory_verdicts`): raises ``TrainSetupError`` for the
    first refused group, returns the warnings."""
    verdicts = memory_verdicts(cm, plan, limit_bytes, pp=pp)
    for v in verdicts:
        if v.verdict == "refused":
            raise TrainSetupError(v.message)
    return [v.message for v in verdicts if v.verdict == "warning"]


def _device_memory_limit(cfg: TrainConfig) -> float | None:
    if cfg.memory_limit_gb is not None:
        return cfg.memory_limit_gb * 1e9
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def preflight(cfg: TrainConfig, world: int, rank: int) -> Prepared:
    """Every check that does not need the model; builds sample info / plan when configured."""
    warns = checks.check_device_settings(cfg, on_cuda=torch.cuda.is_available())  # CPU-only mistakes
    for warning in warns if rank == 0 else []:
        print(f"[hbp] WARNING {warning}", flush=True)
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

    # Build missing inputs on rank 0 only; the other ranks learn the outcome.
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

    from megatron_hbp import load_plan
    from megatron_hbp.data import load_sample_info

    info = load_sample_info(cfg.data.sample_info)
    from megatron_hbp.data.token_files import TokenFileError, check_token_files

    try:  # token files, when there are any, must match the sample info; then no JSONL is read
        has_tokens = check_token_files(info) is not None
    except TokenFileError as e:
        raise TrainSetupError(str(e)) from None
    for f in [] if has_tokens else info.files:
        if not Path(f).exists():
            raise TrainSetupError(
                f"data file {f} listed in {cfg.data.sample_info} does not exist; restore it or rebuild the sample info"
            )
    from megatron_hbp.planner import PlanMismatchError

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
    degrees = sorted({int(g.cp) for g in plan.groups})
    for c in degrees:
        if dp_size % c:
            raise TrainSetupError(
                f"plan uses cp={c}, which does not divide the {dp_size} data x context ranks"
            )
    from megatron_hbp.mcore.attention import _te_available
    from megatron_hbp.mcore.cp_seam import require_cp, resolve_cp_impl

    try:
        require_cp(degrees)
        cp_impl, cp_why = resolve_cp_impl(
            cfg.cp_backend, num_heads=model_cfg.num_attention_heads, num_kv_heads=model_cfg.num_query_groups,
            tp=tp, degrees=degrees, te_available=_te_available(),
        )  # fmt: skip
    except (RuntimeError, ValueError) as e:
        raise TrainSetupError(str(e)) from None

    limit = _device_memory_limit(cfg)
    if limit is not None:
        from megatron_hbp.mcore.attention import select_backend
        from megatron_hbp.mcore.loss import resolve_loss_impl

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
        for warning in check_memory(cm, plan, limit, pp=pp):
            if rank == 0:
                print(f"[hbp] WARNING {warning}", flush=True)
    return Prepared(model_cfg, info, plan, dp_size, cp_impl, cp_why)


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


def _use_bf16(cfg: TrainConfig) -> bool:
    if cfg.dtype == "auto":
        return torch.cuda.is_available()
    return cfg.dtype == "bf16"


def _check_first_samples(prep: Prepared, dataset, dp_rank: int, start: int) -> None:
    """Read the first step's samples of this rank: a changed data file fails here, not mid-run."""
    from megatron_hbp.mcore.data import rank_work_items

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
                fmt=cfg.checkpoint.format, async_save=cfg.checkpoint.async_save,
            )  # fmt: skip
            if rank == 0:
                print(
                    f"[hbp] {'saving' if cfg.checkpoint.async_save else 'saved'} checkpoint {path}",
                    flush=True,
                )
        elif cfg.checkpoint.async_save:
            ckpt.poll_saves()  # commits an async save whose files are written on every rank
        if stop:
            ckpt.wait_for_saves()
            preempt.close()
            logger.close()
            raise Preempted(done, path, preempt.signame)
    ckpt.wait_for_saves()
    preempt.close()
    logger.close()
    return records


def gathered_unique(gathered: list[torch.Tensor], tp: int, pp: int) -> list[list[float]]:
    """One entry per data x context rank from a world all-gather (TP/PP copies dropped).

    Megatron's default order puts TP innermost, then DP, then PP: the ranks with tp_rank 0
    of the first pipeline stage are ``0, tp, 2·tp, ...`` up to ``dp·tp``.
    """
    world = len(gathered)
    dp = world // (tp * pp)
    return [gathered[i * tp].tolist() for i in range(dp)]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a LLaMA-shaped model with Megatron-Core from an HBP plan "
        "(launch with torchrun or srun; one process = one GPU, or one CPU rank with gloo).",
        epilog="examples:\n"
        "  torchrun --nproc-per-node 2 examples/pretrain_llama_hbp.py --config configs/demo_tiny.yaml\n"
        "  python examples/pretrain_llama_hbp.py --config configs/llama3_1_8b_128k_hbp.yaml --dry-run\n"
        "  torchrun --nproc-per-node 8 examples/pretrain_llama_hbp.py --config my.yaml --set optimizer.lr=1e-5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", required=True, help="run YAML (configs/demo_tiny.yaml, configs/llama3_1_8b_128k_hbp.yaml)"
    )
    p.add_argument(
        "--load", default=None, help="checkpoint to resume from (a step_<N> folder or a checkpoint dir)"
    )
    p.add_argument("--metrics-file", default=None, help="JSONL file with one record per step")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many plan steps")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=3e-4 --set checkpoint.dir=runs/x (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="run the pre-flight checks, print the resolved config, stop"
    )
    p.add_argument(
        "--nproc", type=int, default=None, help="--dry-run under plain python: the launch size to check "
        "(default: the plan's world size x tp x pp)",
    )  # fmt: skip
    return p.parse_args(argv)


def config_from_args(args) -> TrainConfig:
    overrides = list(args.overrides)
    if args.load:
        overrides.append(f"checkpoint.load={args.load}")
    if args.metrics_file:
        overrides.append(f"metrics_file={args.metrics_file}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    return load_train_config(args.config, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        checks.check_sample_info_override(args.config, args.overrides, cfg)
        if args.dry_run:
            simulate = not checks.launched()  # plain python: check the launch size of --nproc / the plan
            rank, world, _ = init_distributed()
            world = checks.dry_run_world(cfg, args.nproc) if simulate else world
            prep = preflight(cfg, world, rank)
            if rank == 0:
                print(json.dumps(to_dict(cfg), indent=2))
                print(f"[hbp] pre-flight ok: plan of {prep.plan.num_steps} steps for {prep.dp_size} ranks")
                if simulate:
                    print(
                        f"[hbp] (checked for a launch of {world} processes: torchrun --nproc-per-node {world})"
                    )
            return 0
        run(cfg)
    except Preempted as e:
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[hbp] {e}; exit code {EXIT_PREEMPTED}", flush=True)
        _shutdown()
        return EXIT_PREEMPTED
    except (TrainSetupError, ConfigError) as e:
        if checks.report_error_here(e):  # a config error is the same on every rank: rank 0 says it
            print(f"error: {e}", file=sys.stderr, flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    _shutdown()
    return 0


def _shutdown() -> None:
    if torch.distributed.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
