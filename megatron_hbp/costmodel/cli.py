"""Shared argparse pieces of ``tools/simulate.py`` and ``tools/select_groups.py`` (inputs, cluster,
efficiency overrides), so the two CLIs stay thin and agree."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import yaml

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel.hardware import available_hardware
from megatron_hbp.costmodel.model import CostModel, Efficiency, TrainingSetup
from megatron_hbp.costmodel.paths import (
    DEFAULT_PATH_PROFILE,
    PathProfile,
    available_path_profiles,
    load_path_profile,
)
from megatron_hbp.model_config import available_presets


def add_input_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--sample-info", type=Path, help="sample-info .npz (lengths, loss_tokens, fingerprint)")
    src.add_argument("--lengths", type=Path, help=".npy of per-sample lengths (loss tokens = lengths)")
    src.add_argument(
        "--synth", help="named synthetic distribution, e.g. tulu3_longcite (tools/synth_lengths.py)"
    )
    src.add_argument(
        "--indexed",
        help="an existing Megatron IndexedDataset prefix (PATH for PATH.idx/.bin): one sample per "
        "document, every token a loss token unless --loss-mask is given",
    )
    p.add_argument("--loss-mask", help="with --indexed: IndexedDataset of the loss mask (nonzero = loss)")
    p.add_argument("--scale", type=float, default=1.0, help="--synth: multiply the sample counts (default 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of synthetic data, plans and shuffles (default 0)"
    )


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="llama3_1_8b", help=f"model preset or YAML ({', '.join(available_presets())})"
    )
    p.add_argument(
        "--gpu", default="h100_sxm", help=f"hardware profile or YAML ({', '.join(available_hardware())})"
    )
    p.add_argument("--num-gpus", type=int, default=32, help="GPUs in the job (default 32)")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="NVLink domain size (default: the profile's)"
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument(
        "--profile",
        default=DEFAULT_PATH_PROFILE,
        help="code-path profile (efficiencies + implementation knobs) by name or YAML: "
        f"{', '.join(available_path_profiles())} (default {DEFAULT_PATH_PROFILE}: this trainer's path, "
        "calibrated on an H100; te: a Transformer Engine path, estimates)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an Efficiency or TrainingSetup field of the profile, e.g. --set dense_mfu=0.5 "
        "--set memory_reserve_gib=6 --set cp_impl=ring (repeatable)",
    )


def read_inputs(a: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(lengths, loss_tokens or None, description)."""
    if getattr(a, "loss_mask", None) and not getattr(a, "indexed", None):
        raise ConfigError("--loss-mask goes with --indexed PREFIX")
    if a.synth:
        from megatron_hbp.planner.synth import synth_lengths

        lengths = synth_lengths(a.synth, a.seed, a.scale)
        return lengths, None, f"synthetic {a.synth} (scale {a.scale}, seed {a.seed})"
    if getattr(a, "indexed", None):
        from megatron_hbp.data.token_files import TokenFileError, read_indexed  # NumPy only

        try:
            lengths, loss = read_indexed(a.indexed, a.loss_mask)
        except TokenFileError as e:
            raise ConfigError(str(e)) from None
        return lengths, loss, f"IndexedDataset {a.indexed}"
    if a.sample_info:
        from megatron_hbp.planner.io import read_sample_info

        lengths, loss, _ = read_sample_info(a.sample_info)
        return lengths, loss, str(a.sample_info)
    from megatron_hbp.planner.io import read_lengths

    return read_lengths(a.lengths), None, str(a.lengths)


def _parse_value(raw: str):
    """A ``--set`` value as YAML would read it (numbers, true/false, strings); the dataclass
    conversion in ``configio.from_dict`` then checks its type against the field."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def build_cost_model(a: argparse.Namespace) -> CostModel:
    eff_fields = {f.name: f for f in dataclasses.fields(Efficiency)}
    setup_fields = {f.name: f for f in dataclasses.fields(TrainingSetup)}
    eff, setup = {}, {"tensor_parallel": a.tp}
    for item in a.set:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        if key in eff_fields:
            eff[key] = _parse_value(raw)
        elif key in setup_fields:
            setup[key] = _parse_value(raw)
        else:
            raise ConfigError(
                f"--set {key}: unknown; Efficiency fields: {', '.join(eff_fields)}; "
                f"TrainingSetup fields: {', '.join(setup_fields)}"
            )
    prof = load_path_profile(getattr(a, "profile", None) or DEFAULT_PATH_PROFILE)
    a.path_profile = prof
    efficiency, training_setup = prof.resolve(eff, setup)
    return CostModel(
        a.model,
        a.gpu,
        num_gpus=a.num_gpus,
        gpus_per_node=a.gpus_per_node,
        setup=training_setup,
        efficiency=efficiency,
    )


# Printed by describe() in its own words; every other TrainingSetup field is listed when changed.
_DESCRIBED_SETUP = ("tensor_parallel", "memory_reserve_gib", "fused_loss", "distributed_optimizer", "cp_impl")


def describe_profile(cm: CostModel, profile: PathProfile | None) -> str:
    """One line: the code-path profile and the CP backend the numbers assume."""
    name = profile.name if profile is not None else "(none: cost-model defaults)"
    desc = f" -- {profile.description}" if profile is not None and profile.description else ""
    return f"profile: {name}{desc}; CP backend (cp_impl): {cm.setup.cp_impl}"


def describe(cm: CostModel) -> str:
    """One-line banner: model, GPUs, efficiencies, memory options, ``cp_impl`` and every other
    implementation knob of ``TrainingSetup`` that is not at its default (``name=value``)."""
    e, s, hw = cm.efficiency, cm.setup, cm.hardware
    default = TrainingSetup()
    changed = [
        f"{f.name}={getattr(s, f.name)}"
        for f in dataclasses.fields(TrainingSetup)
        if f.name not in _DESCRIBED_SETUP and getattr(s, f.name) != getattr(default, f.name)
    ]
    return (
        f"model {cm.model.name} ({cm.model.num_parameters() / 1e9:.2f}B), {cm.num_gpus} x {hw.name} "
        f"({cm.gpus_per_node}/node, {hw.memory_gib} GiB), TP {s.tensor_parallel}; efficiency: dense {e.dense_mfu}, "
        f"attention {e.attention_mfu}, HBM {e.hbm_efficiency}, NVLink {e.nvlink_efficiency}, "
        f"network {e.network_efficiency}, CP compute {e.cp_compute_efficiency}, "
        f"overhead {e.microbatch_overhead_s * 1e3:g} ms/micro-batch; "
        f"reserve {s.memory_reserve_gib} GiB, fused loss {s.fused_loss}, distributed optimizer {s.distributed_optimizer}, "
        f"CP {s.cp_impl}; "
        + (f"non-default setup: {', '.join(changed)}" if changed else "other setup at defaults")
    )


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected a comma-separated list of integers, got '{text}'") from None
