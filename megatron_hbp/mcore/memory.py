"""The pre-flight out-of-memory rule: the cost model of the trainer's own code path
(:func:`trainer_cost_model`), each plan group's verdict against the device memory
(:func:`memory_verdicts`, also used by ``tools/preflight.py``) and the check that refuses a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as _replace

import torch

from megatron_hbp.costmodel import CostModel, TrainingSetup
from megatron_hbp.costmodel.hardware import HardwareProfile, hardware_for_device_name
from megatron_hbp.mcore.config import TrainConfig
from megatron_hbp.mcore.launch import TrainSetupError
from megatron_hbp.model_config import ModelConfig


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


def hardware_for_device(device_name: str, limit_bytes: float):
    """Cost-model hardware profile of a GPU called ``device_name`` (``torch.cuda.get_device_name``).

    A GPU with a profile (its ``device_names`` in the CUDA device name) gets it; any other GPU, or no GPU
    (``memory_limit_gb`` on CPU), gets a generic profile with the memory limit as its memory: its
    throughput fields are placeholders that ``CostModel.memory`` never reads, and borrowing the
    H100's would print an H100 banner (and H100 speeds to anyone reusing the model) for a GPU it is
    not."""
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
        from megatron.core.models.gpt import gpt_layer_specs  # optional here; after init_distributed

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
    sq = plan.workload.group_max_sum_sq(plan.arrays["step_group"], len(plan.groups))  # largest Σl² of a pack
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
