"""Code-path profiles (costmodel/hardware/paths/*.yaml) and the tools' banners."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel import CalibrationPoint, CostModel, Efficiency, TrainingSetup
from megatron_hbp.costmodel.paths import available_path_profiles, load_path_profile
from megatron_hbp.costmodel.profiler import calibrate

MEASURED = [
    Path("docs/measurements/h100_2026-11-26_recompute_mix.json"),
    Path("docs/measurements/h100_2026-11-26_recompute_single_doc.json"),
]


def test_shipped_profiles():
    assert {"trainer_h100", "te"} <= set(available_path_profiles())
    eff, setup = load_path_profile("trainer_h100").resolve()
    assert (eff.dense_mfu, eff.attention_mfu, eff.microbatch_overhead_s) == (0.338, 0.294, 0.0097)
    assert setup.attention_expand_kv and setup.rope_impl == "unfused" and setup.swiglu_impl == "unfused"
    assert setup.cp_impl == "ulysses"
    eff, setup = load_path_profile("te").resolve()
    assert eff == Efficiency() and setup == TrainingSetup()
    # overrides on top of a profile (what --set does)
    eff, setup = load_path_profile("trainer_h100").resolve({"dense_mfu": 0.5}, {"cp_impl": "ring"})
    assert eff.dense_mfu == 0.5 and eff.attention_mfu == 0.294 and setup.cp_impl == "ring"


def test_trainer_profile_is_the_calibration_of_the_measured_h100_runs():
    """The shipped numbers are the least-squares fit of the 18 measured H100 points (the trainer's
    path, llama_1b), rounded as shipped: refit here from the measurement files."""
    runs = [json.loads(p.read_text()) for p in MEASURED]
    assert {r["device"] for r in runs} == {"NVIDIA H100 80GB HBM3"}
    _, setup = load_path_profile("trainer_h100").resolve(setup={"distributed_optimizer": False})
    cm = CostModel("llama_1b", "h100_sxm", num_gpus=1, setup=setup)
    points = [
        CalibrationPoint(
            [np.asarray(d, np.int64) for d in x["pack_docs"]],
            x["pack_length"],
            1,
            x["recompute_layers"],
            x["time_s"],
        )
        for r in runs
        for x in r["rows"]
        if not x.get("oom") and "pack_docs" in x
    ]
    assert len(points) == 18
    rep = calibrate(cm, points)
    eff, _ = load_path_profile("trainer_h100").resolve()
    assert round(rep.efficiency.dense_mfu, 3) == eff.dense_mfu
    assert round(rep.efficiency.attention_mfu, 3) == eff.attention_mfu
    assert round(rep.efficiency.microbatch_overhead_s, 4) == eff.microbatch_overhead_s
    assert rep.rms_relative_error == pytest.approx(0.027, abs=0.0005)


def test_bad_profiles(tmp_path):
    with pytest.raises(ConfigError, match="unknown path profile 'nope'.*trainer_h100"):
        load_path_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nefficiency: {dense_mfu: 0.5, dens_mfu: 0.4}\n")
    with pytest.raises(
        ConfigError, match="path profile 'bad' efficiency: unknown key.*dens_mfu.*did you mean 'dense_mfu'"
    ):
        load_path_profile(bad)
    bad.write_text("name: bad\nsetup: {cp_impl: nope}\n")
    with pytest.raises(ConfigError, match="cp_impl must be one of"):
        load_path_profile(bad)
    bad.write_text("name: bad\nsetup: [1, 2]\n")
    with pytest.raises(ConfigError, match="setup must be a mapping"):
        load_path_profile(bad)


def _tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(f"tools/{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_simulate_prints_profile_and_cp_backend(capsys):
    tool = _tool("simulate")
    argv = ["--synth", "tulu3_longcite", "--scale", "0.002", "--strategies", "hbp_ours,dynamic_cp_upstream"]
    argv += ["--micro-batches", "1"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "profile: trainer_h100" in out and "CP backend (cp_impl): ulysses" in out
    assert (
        "| ISF 128K/CP8 |" in out and "| Megatron-LM packing scheduler (DpBalanced) |" in out
    )  # ISF always first
    assert tool.main([*argv, "--profile", "te", "--set", "cp_impl=allgather"]) == 0
    out = capsys.readouterr().out
    assert "profile: te" in out and "CP backend (cp_impl): allgather" in out and "dense 0.6," in out
    assert tool.main([*argv, "--profile", "nope"]) == 2
    assert "unknown path profile" in capsys.readouterr().err


def test_simulate_saved_plans(tmp_path, capsys):
    """--plans: saved plans simulated as they are; the table's speed-up is per trained token against
    the first plan, and the seconds line matches simulate_plan on the same cost model."""
    from megatron_hbp.costmodel import CostModel
    from megatron_hbp.costmodel.simulate import simulate_plan
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan
    from megatron_hbp.planner.synth import synth_lengths

    lengths = synth_lengths("short_chat", 0, 0.02)
    paths = []
    for name, groups in (
        ("isf", [GroupConfig(pack_length=8192)]),
        ("two", [GroupConfig(pack_length=2048), GroupConfig(pack_length=8192)]),
    ):
        cfg = PlanConfig(groups=groups, world_size=2, tokens_per_step=65536, last_step="shrink")
        paths.append(build_plan(lengths, None, cfg).save(tmp_path / f"{name}.npz"))
    tool = _tool("simulate")
    argv = ["--plans", ",".join(map(str, paths)), "--model", "llama_1b", "--num-gpus", "2"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert f"| {paths[0]} |" in out and "1.00x |" in out
    _, setup = load_path_profile("trainer_h100").resolve()
    eff, _ = load_path_profile("trainer_h100").resolve()
    from megatron_hbp.planner import load_plan

    cm = CostModel("llama_1b", "h100_sxm", num_gpus=2, setup=setup, efficiency=eff)
    secs = simulate_plan(load_plan(paths[1]), cm).epoch_s
    assert f"{paths[1]}: {secs:.2f} s simulated" in out
    assert tool.main(["--plans", str(tmp_path / "missing.npz"), "--num-gpus", "2"]) == 2
    assert tool.main(["--num-gpus", "2"]) == 2


def test_simulate_reads_a_users_lengths_file(tmp_path, capsys):
    lengths = np.concatenate([np.full(400, 700), np.full(6, 100_000)]).astype(np.int32)
    np.save(tmp_path / "mine.npy", lengths)
    tool = _tool("simulate")
    argv = ["--lengths", str(tmp_path / "mine.npy"), "--micro-batches", "1", "--strategies", "hbp_ours"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert f"data: {tmp_path / 'mine.npy'}: 406 samples, 880,000 tokens, max 100000" in out
    assert "| HBP + BFD + LPT (ours) |" in out
