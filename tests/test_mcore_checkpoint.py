"""Checkpoint compatibility, the pre-flight memory estimate, launch-environment parsing (no processes)."""

import pytest

from megatron_hbp.mcore.checkpoint import CheckpointMismatchError, check_compatible
from megatron_hbp.mcore.train import estimate_memory_bytes
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


def test_memory_estimate_by_hand():
    tiny = load_model_config("tiny")
    p = tiny.num_parameters()
    # fp32, no recompute: weights 4 + grads 4 + Adam 8 bytes/param, activations 68 B x hidden per
    # token and layer, fp32 logits + grad 8 B per vocabulary entry
    t = 1000
    want = 16 * p + t * 64 * 68 * 2 + t * 32000 * 8
    assert estimate_memory_bytes(tiny, t, bf16=False) == int(want)
    # recomputing both layers keeps only their 2-value inputs (fp32: 2 x 4 bytes x hidden)
    want_rc = 16 * p + t * 64 * 2 * 2 * 4 + t * 32000 * 8
    assert estimate_memory_bytes(tiny, t, bf16=False, recompute_layers=2) == int(want_rc)
    # the 8B model at 16K tokens per GPU with 28 recomputed layers and the distributed optimizer
    # fits an 80 GiB GPU by this floor, 128K tokens per GPU clearly does not
    m8 = load_model_config("llama3_1_8b")
    kw = dict(recompute_layers=28, dp=32, bf16=True, distributed_optimizer=True)
    assert estimate_memory_bytes(m8, 16384, **kw) < 80 * 2**30 < estimate_memory_bytes(m8, 131072, **kw)


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
