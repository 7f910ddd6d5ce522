#!/usr/bin/env python
"""Simulate one epoch of several strategies on the same samples and print ABR/DBR/CR, GPU-hours
and the speed-up against the first (ISF) row.

  python tools/simulate.py --synth tulu3_longcite                       # the paper's 8B / 32 x H100 setting
  python tools/simulate.py --lengths cache/tulu3_longcite.npy --micro-batches 1
  python tools/simulate.py --sample-info cache/demo/sample_info.npz --model llama_1b --num-gpus 8
  python tools/simulate.py --synth tulu3_longcite --set attention_mfu=0.3 --json runs/sim.json
  python tools/simulate.py --synth chat_heavy --profile te --set cp_impl=allgather
  python tools/simulate.py --plans runs/bench_train/plan_isf.npz,runs/bench_train/plan_hbp.npz --model llama_1b --num-gpus 1

Strategies (``--strategies``, default all; the ISF row is always simulated first as the baseline):
isf (one max-length group, CP = max-length / tokens-per-gpu, ISF packing, no balancing), hbp_groups
(HBP groups, ISF + GreedyFill, no balancing), hbp (+ the paper's attention sort), hbp_ours
(best-fit decreasing + LPT on the cost model's linear + attention cost), dynamic_cp (Megatron's
hybrid CP: BalancedCPScheduler, one micro-batch per sub-sample; megatron-core 0.19.2, unchanged in
Megatron-LM at d98e8a64), dynamic_cp_upstream (Megatron-LM's sequence-packing DpBalancedScheduler at
d98e8a64: next-fit packs under max-seqlen-per-rank x CP, static CP), dynamic_cp_packed (what-if:
hybrid CP with its CP-1 sub-samples packed per GPU), dynamic_cp_packed_linear (what-if: packed, and
balancing (a l + l^2) / cp with the cost model's a instead of l^2 / cp).

Every row uses the same samples and the same code-path profile (``--profile``, default
trainer_h100: this trainer's path calibrated on an H100; ``--profile te`` for a Transformer Engine
path); the banner says which profile and CP backend (``--set cp_impl=...``) are assumed.
Formulas: megatron_hbp/costmodel/model.py, docs/costmodel.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel.cli import (
    add_cluster_args,
    add_input_args,
    build_cost_model,
    describe,
    describe_profile,
    parse_int_list,
    read_inputs,
)
from megatron_hbp.costmodel.simulate import default_strategies, format_table, run_strategies

KEYS = (
    "isf",
    "hbp_groups",
    "hbp",
    "hbp_ours",
    "dynamic_cp",
    "dynamic_cp_upstream",
    "dynamic_cp_packed",
    "dynamic_cp_packed_linear",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p, required=False)
    add_cluster_args(p)
    p.add_argument(
        "--plans",
        default=None,
        help="instead of the strategies: simulate these saved plans (plan.npz, comma-separated; the first "
        "is the baseline), e.g. the HBP and ISF plans of tools/bench_train_gpu.py",
    )
    p.add_argument("--tokens-per-gpu", type=int, default=16384, help="tokens per GPU per micro-batch (16384)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per replica per step (4)")
    p.add_argument("--max-length", type=int, default=131072, help="ISF pack length / largest group (131072)")
    p.add_argument(
        "--hbp-groups",
        default=None,
        help="HBP groups as LENGTH:CP,... (default: tokens-per-gpu:1,max-length:max-length/tokens-per-gpu)",
    )
    p.add_argument(
        "--upstream-cp",
        type=int,
        default=None,
        help="static CP of the dynamic_cp_upstream row (default max-length / tokens-per-gpu; its "
        "max_seqlen_per_dp_cp_rank is max-length / this)",
    )
    p.add_argument(
        "--strategies", default=",".join(KEYS), help=f"comma-separated subset of {', '.join(KEYS)}"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="never show the progress bar (off anyway when stderr is not a terminal)",
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    a = p.parse_args(argv)
    if a.plans:
        return simulate_saved_plans(a)
    if not (a.synth or a.lengths or a.sample_info):
        print("error: give --synth, --lengths or --sample-info (or --plans)", file=sys.stderr)
        return 2
    try:
        lengths, loss, desc = read_inputs(a)
        cm = build_cost_model(a)
        groups = None
        if a.hbp_groups:
            groups = []
            for item in a.hbp_groups.split(","):
                length, _, cp = item.partition(":")
                groups.append((parse_int_list(length)[0], int(cp or 1)))
        wanted = [s.strip() for s in a.strategies.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in KEYS]
        if unknown:
            raise ConfigError(f"--strategies: unknown {unknown}; choose from {', '.join(KEYS)}")
        all_s = {
            s.key: s
            for s in default_strategies(
                cm,
                tokens_per_gpu=a.tokens_per_gpu,
                micro_batches=a.micro_batches,
                max_length=a.max_length,
                hbp_groups=groups,
                upstream_cp=a.upstream_cp,
                seed=a.seed,
            )
        }
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "isf" in wanted:
        wanted.remove("isf")
    strategies = [all_s[k] for k in ["isf", *wanted]]
    tokens_per_step = cm.dp_cp_ranks * a.tokens_per_gpu * a.micro_batches
    print(f"data: {desc}: {len(lengths)} samples, {int(lengths.sum()):,} tokens, max {int(lengths.max())}")
    print(describe_profile(cm, a.path_profile))
    print(describe(cm))
    print(
        f"step: {tokens_per_step:,} tokens ({a.micro_batches} micro-batches x {a.tokens_per_gpu} tokens x GPUs)"
    )
    for s in strategies:
        if s.plan is not None:
            g = ", ".join(
                f"{x.pack_length // 1024}K/CP{x.cp}/ckpt{x.recompute_layers}" for x in s.plan.groups
            )
            print(f"  {s.name}: groups {g}; packer {s.plan.packer}, balance {s.plan.balance}")
        else:
            print(f"  {s.name}: max_seqlen_per_dp_cp_rank {s.max_seqlen_per_rank}")
    t0 = time.perf_counter()
    try:
        results = run_strategies(
            lengths,
            cm,
            strategies,
            loss_tokens=loss,
            tokens_per_step=tokens_per_step,
            seed=a.seed,
            progress=not a.no_progress and sys.stderr.isatty(),  # no bar in captured logs
        )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    for r in results:
        if "cp" in r.extra and r.extra.get("micro_batches_per_step"):
            print(
                f"  {r.name}: static CP {r.extra['cp']}, {r.extra['recompute_layers']} recomputed layers, "
                f"{r.extra['micro_batches_per_step']:.2f} micro-batches per step on average"
            )
    print(
        f"\n(simulated in {time.perf_counter() - t0:.1f} s; speed-up = ({results[0].name} GPU-hours per token) / "
        "(row GPU-hours per token), same samples and profile)"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "name": r.name,
                "ABR": r.abr,
                "DBR": r.dbr,
                "CR": r.cr,
                "steps": r.num_steps,
                "gpu_hours": r.gpu_hours,
                "compute_s": r.compute_s,
                "cp_comm_s": r.cp_comm_s,
                "dp_comm_s": r.dp_comm_s,
                "tokens": r.tokens,
                "dropped": r.num_dropped,
                "speedup_vs_first": (results[0].gpu_hours / results[0].tokens) / (r.gpu_hours / r.tokens)
                if results[0].tokens and r.tokens and r.gpu_hours > 0 and results[0].gpu_hours > 0
                else None,
                "extra": {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str, list))},
            }
            for r in results
        ]
        a.json.write_text(
            json.dumps(
                {
                    "data": desc,
                    "profile": a.path_profile.name,
                    "cp_impl": cm.setup.cp_impl,
                    "setup": describe(cm),
                    "results": rows,
                },
                indent=1,
            )
        )
        print(f"wrote {a.json}")
    return 0


def simulate_saved_plans(a) -> int:
    """``--plans``: simulate saved plans on the cost model (world size = the plan's)."""
    from megatron_hbp.costmodel.simulate import simulate_plan
    from megatron_hbp.planner import load_plan

    try:
        cm = build_cost_model(a)
        plans = [(path, load_plan(path)) for path in a.plans.split(",") if path]
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_profile(cm, a.path_profile))
    print(describe(cm))
    try:
        results = [simulate_plan(plan, cm, name=path) for path, plan in plans]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    for r in results:
        print(f"  {r.name}: {r.epoch_s:.2f} s simulated, {r.tokens / r.epoch_s:,.0f} tokens/s per GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
