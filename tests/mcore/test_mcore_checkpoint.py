"""Checkpoint compatibility, the pre-flight memory check (cost model of the trainer's path), launch-environment parsing (no processes)."""

import numpy as np
import pytest

from megatron_hbp.mcore.checkpoint import CheckpointMismatchError, check_compatible
from megatron_hbp.mcore.train import (
    TrainSetupError,
    check_memory,
    hardware_for_device,
    trainer_cost_model,
)
from megatron_hbp.model_config import load_model_config

META = {
    "plan_hash": "abc",
    "model": {"name": "tiny", "num_layers": 2, "hidden_size": 64},
    "tp": 1,
    "pp": 1,
    "world_size": 2,
    "loss_normalization": "step_token_mean",
    "distributed_optimizer": False,
}


def test_same_meta_is_accepted():
    check_compatible(META, dict(META), "ck")


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"plan_hash": "xyz"}, "different plan"),
        (
            {"model": {"name": "tiny", "num_layers": 4, "hidden_size": 64}},
            "model config (differs in: num_layers)",
        ),
        ({"tp": 2}, "tensor parallel size (1 vs now 2)"),
        ({"world_size": 4}, "world size (2 vs now 4)"),
        ({"loss_normalization": "sample_mean"}, "loss normalization"),
    ],
)
def test_mismatch_is_refused_with_the_difference(change, needle):
    with pytest.raises(CheckpointMismatchError, match="ck_dir") as e:
        check_compatible(META, dict(META, **change), "ck_dir")
    assert needle in str(e.value)


GIB = 2**30


def _tiny_cm(**kw):
    args = dict(world=2, bf16=True, attention_backend="varlen", fused_loss=True, memory_reserve_gib=0.0)
    args.update(kw)
    return trainer_cost_model(load_model_config("tiny"), **args)


def test_memory_estimate_by_hand():
    """The trainer's path on tiny (h 64, ffn 176, 4 heads of 16, 2 K/V groups, V 32000), bf16,
    varlen flash with K/V expanded to 4 heads, torch RMSNorm, apply_rope, unfused SwiGLU, fused loss."""
    tiny = load_model_config("tiny")
    p = tiny.num_parameters()
    # per token and full layer: 2 norms x (fp32 input copy + fp32 x*rstd + rstd = 8h+4, output 2h),
    # q, expanded k, v, output 2 x 4 x 64, fp32 LSE 4 x 4, fp32 cos/sin 16 x 16, SwiGLU 2 x 5 x 176
    full = 2 * (8 * 64 + 4 + 2 * 64) + 2 * 4 * 64 + 4 * 4 + 16 * 16 + 2 * 5 * 176
    assert full == 3832
    t = 1000
    loss = 2 * (
        32000 * 64 + 64 * t + 512 * 32000
    )  # fused in_forward: dweight + dhidden + one 512-token chunk
    static = p * (2 + 4) + 12 * p  # bf16 weights, fp32 main grads, fp32 master + Adam (not sharded)
    m = _tiny_cm().memory(t, 1, 0)
    assert m.total == pytest.approx(static + t * (2 * full + 3 * 2 * 64) + loss, rel=1e-12)
    # both layers recomputed: their 2h-byte inputs, one layer re-materialised in backward
    m2 = _tiny_cm().memory(t, 1, 2)
    assert m2.activations == pytest.approx(t * (2 * 128 + full + 3 * 128), rel=1e-12)
    # distributed optimizer: the 12 B/param states sharded over the 2 DP x CP ranks
    assert _tiny_cm(distributed_optimizer=True).memory(t, 1, 0).optimizer == pytest.approx(6 * p)
    # CP 2 through megatron_hbp.cp's Ulysses (the default): 500 local tokens; the kernel saves q, the
    # expanded K/V and its output over 2 of the 4 heads of all 1000 tokens (= the local sizes) and
    # the output projection saves the local output again (+ 2 x 64); transient: 3 copies of the
    # local q|k|v (64 + 2 x 2 x 16 values, 1 K/V head per rank) in bf16
    mc = _tiny_cm().memory(t, 2, 0)
    full_cp = full + 2 * 64
    assert mc.activations == pytest.approx(500 * (2 * full_cp + 3 * 128), rel=1e-12)
    assert mc.cp_buffers == pytest.approx(3 * 500 * (64 + 2 * 2 * 16) * 2)
    # the all-gather fallback keeps the local q, k, v (unexpanded) and the output: 2 x (64 + 2 x 32 + 64)
    mg = _tiny_cm(cp_impl="allgather").memory(t, 2, 0)
    assert mg.activations == pytest.approx(500 * (2 * (full - 528 + 2 * (64 + 64 + 64)) + 3 * 128), rel=1e-12)
    assert mg.cp_buffers == pytest.approx(2 * t * 2 * 32 * 2)
    # te keeps K/V at 2 groups: 2 x (2 x 64 + 2 x 32) + 16 instead of 528 bytes
    assert _tiny_cm(attention_backend="te").memory(t, 1, 0).activations == pytest.approx(
        t * (2 * (full - 528 + 2 * (2 * 64 + 2 * 32) + 16) + 384), rel=1e-12
    )


def test_trainer_cost_model_knobs_match_costmodel():
    """The knob mapping, checked against a CostModel built by hand from TrainingSetup."""
    from megatron_hbp.costmodel import CostModel, TrainingSetup

    m8 = load_model_config("llama3_1_8b")
    common = dict(
        distributed_optimizer=True, rope_impl="unfused", swiglu_impl="unfused", rmsnorm_impl="unfused",
        grad_bytes=4, activation_bytes=2,
    )  # fmt: skip
    for impl in ("ulysses", "allgather"):
        ref = CostModel(
            m8, "h100_sxm", num_gpus=32, setup=TrainingSetup(attention_expand_kv=True, cp_impl=impl, **common)
        )
        kw = {} if impl == "ulysses" else {"cp_impl": impl}  # ulysses: the trainer's default
        got = trainer_cost_model(m8, world=32, attention_backend="varlen", distributed_optimizer=True, **kw)
        for T, c, k in ((16384, 1, 28), (131072, 8, 0), (131072, 8, 32)):
            assert got.memory(T, c, k) == ref.memory(T, c, k)
    assert got.setup.memory_reserve_gib == TrainingSetup().memory_reserve_gib
    sd = trainer_cost_model(m8, world=32, attention_backend="sdpa", bf16=False, fused_loss=False)
    assert (sd.setup.attention_impl, sd.setup.activation_bytes, sd.setup.fused_loss) == ("math", 4, False)
    # pipeline stage: 32 / 4 layers, world 32 = 4 stages x 8 DP x CP ranks
    pp = trainer_cost_model(m8, world=32, pp=4, distributed_optimizer=True)
    assert pp.model.num_layers == 8 and pp.dp_cp_ranks == 8
    # 8B, 16K tokens per GPU: 28 recomputed layers leave the trainer's unfused path over an 80 GB H100
    # (79.6 GiB), 31 fit; 128K over CP 8 as well (until the all-gather path kept only the local q, k, v
    # it needed all 32 layers recomputed); Ulysses keeps the same per-rank tensors plus one output copy
    assert got.min_recompute_layers(16384, 1) == 31
    assert got.memory(16384, 1, 28).total > 79.6 * GIB > got.memory(16384, 1, 31).total
    assert got.min_recompute_layers(131072, 8) == 31
    uly = trainer_cost_model(m8, world=32, attention_backend="varlen", distributed_optimizer=True)
    assert uly.min_recompute_layers(131072, 8) == 31


def test_hardware_for_device():
    assert hardware_for_device("NVIDIA H100 80GB HBM3", 85e9).name == "h100_sxm"
    assert hardware_for_device("NVIDIA H200", 150e9).name == "h200"
    assert hardware_for_device("NVIDIA A100-SXM4-80GB", 85e9).name == "a100_sxm"
    hw = hardware_for_device("NVIDIA A100-SXM4-40GB", 42.1e9)  # no profile: generic, memory = the limit
    assert hw.name == "generic (NVIDIA A100-SXM4-40GB)" and hw.memory_bytes == pytest.approx(42.1e9)


def _plan(groups, lengths):
    from megatron_hbp.planner import PlanConfig, build_plan

    return build_plan(
        np.array(lengths), None, PlanConfig(groups=groups, world_size=2, micro_batches_per_step=1)
    )


def test_check_memory_names_group_components_and_fix():
    from megatron_hbp.planner import GroupConfig

    plan = _plan(
        [GroupConfig(pack_length=64), GroupConfig(pack_length=256, cp=2)],
        [10, 20, 30, 50, 100, 150, 200, 210],
    )
    cm = _tiny_cm()
    need = cm.memory(256, 2, 0).total
    assert need > cm.memory(64, 1, 0).total
    check_memory(cm, plan, need + 1)  # fits exactly: no error
    with pytest.raises(TrainSetupError) as e:
        check_memory(cm, plan, need - 1)
    msg = str(e.value)
    assert "out-of-memory risk: group 1 (pack_length=256 cp=2 recompute_layers=0)" in msg
    assert f"needs {need / GIB:.2f} GiB" in msg and "activations" in msg and "cp_buffers" in msg
    # 2 layers: recomputing 1 still re-materialises a full layer in backward, only both layers save
    assert "recompute_layers >= 2 fits" in msg and "raise cp" in msg

    # Over the limit only through the reserve: a warning, not an error.
    reserve = 2**30
    cm_r = _tiny_cm(memory_reserve_gib=1.0)
    need_r = cm_r.memory(256, 2, 0).total
    assert need_r == need + reserve
    assert check_memory(cm_r, plan, need_r + 1) == []
    warnings = check_memory(cm_r, plan, need_r - reserve + 1)
    # both groups only exceed through the 1 GiB reserve (group 0 needs less than group 1)
    assert [w.split(" (")[0] for w in warnings] == [
        "out-of-memory risk: group 0",
        "out-of-memory risk: group 1",
    ]
    assert all("warning only" in w for w in warnings)
    with pytest.raises(TrainSetupError):
        check_memory(cm_r, plan, need_r - reserve - 1)


def test_launch_environment(monkeypatch):
    from megatron_hbp.mcore.train import TrainSetupError, dist_env

    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "MASTER_ADDR",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_PORT", "29555")
    # torchrun
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == (5, 8, 1)
    # Slurm srun: ranks from SLURM_*, MASTER_ADDR required
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_NTASKS", "32")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    with pytest.raises(TrainSetupError, match="MASTER_ADDR"):
        dist_env()
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert dist_env() == (13, 32, 5)
    # a plain single process
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k)
    assert dist_env() == (0, 1, 0)


def test_describe_prints_cp_impl_and_changed_knobs():
    from megatron_hbp.costmodel import CostModel
    from megatron_hbp.costmodel.cli import describe

    plain = describe(CostModel("tiny"))
    assert "CP ring; other setup at defaults" in plain
    trainer = describe(_tiny_cm())
    assert "CP ulysses; non-default setup: memory_reserve_gib" not in trainer  # reserve printed on its own
    assert trainer.endswith(
        "CP ulysses; non-default setup: attention_expand_kv=True, rope_impl=unfused, swiglu_impl=unfused, "
        "rmsnorm_impl=unfused"
    ), trainer
    assert "reserve 0.0 GiB" in trainer and "distributed optimizer False" in trainer
