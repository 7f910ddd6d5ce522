"""The trainer's command line (``examples/pretrain_llama_hbp.py``): argument parsing, config
overrides, ``--dry-run`` and exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megatron_hbp.configio import ConfigError, to_dict
from megatron_hbp.mcore import preflight_checks as checks
from megatron_hbp.mcore.config import TrainConfig, load_train_config
from megatron_hbp.mcore.launch import TrainSetupError, _shutdown, init_distributed
from megatron_hbp.mcore.preemption import EXIT_PREEMPTED, Preempted
from megatron_hbp.mcore.preflight import preflight

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


def _dry_run(cfg: TrainConfig, args) -> int:
    """``--dry-run``: the pre-flight checks and the resolved config, no model."""
    simulate = not checks.launched()  # plain python: check the launch size of --nproc / the plan
    rank, world, _ = init_distributed()
    world = checks.dry_run_world(cfg, args.nproc) if simulate else world
    prep = preflight(cfg, world, rank)
    if rank == 0:
        print(json.dumps(to_dict(cfg), indent=2))
        print(f"[hbp] pre-flight ok: plan of {prep.plan.num_steps} steps for {prep.dp_size} ranks")
        if simulate:
            print(f"[hbp] (checked for a launch of {world} processes: torchrun --nproc-per-node {world})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
        checks.check_sample_info_override(args.config, args.overrides, cfg)
        if args.dry_run:
            return _dry_run(cfg, args)
        init_distributed()  # before Megatron is imported: other ranks then keep its import warnings quiet
        from megatron_hbp.mcore.loop import run  # deferred: imports megatron.core (see above)

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
