#!/usr/bin/env python
"""Time the planner stage by stage on synthetic data, on one CPU core, and report peak memory.

  python tools/bench_plan.py                      # tulu3_longcite x1 (1.002M samples) and x10 (10.02M)
  python tools/bench_plan.py --scales 1 --repeat 3

Each scale runs in a fresh child process pinned to one core (os.sched_setaffinity), so the
peak RSS (resource.getrusage ru_maxrss) is that run's own. Times are wall and CPU seconds
(time.process_time); on a shared machine the CPU column is the one-core cost. The
balancer comparison (mean over steps of max/mean replica cost, same packs) is printed too.
Nothing is asserted: this prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("grouping", "packing", "greedy_fill", "balancing", "ordering")


def child(scale: float, config: str, cpu: int | None, dist: str) -> dict:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    from megatron_hbp.planner import build_plan, compute_metrics, load_plan_config
    from megatron_hbp.planner.report import balance_summary
    from megatron_hbp.planner.synth import synth_lengths

    lengths = synth_lengths(dist, seed=0, scale=scale)
    cfg = load_plan_config(config)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.perf_counter(), time.process_time()
    plan = build_plan(lengths, None, cfg)
    t1, c1 = time.perf_counter(), time.process_time()
    rep = compute_metrics(plan, cp_balance=False)
    t2, c2 = time.perf_counter(), time.process_time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "scale": scale,
        "num_samples": len(lengths),
        "wall": {**plan.stats["stage_seconds"], "metrics": t2 - t1, "total": t2 - t0, "plan": t1 - t0},
        "cpu": {**plan.stats["stage_cpu_seconds"], "metrics": c2 - c1, "total": c2 - c0, "plan": c1 - c0},
        "peak_rss_mb": rss,
        "rss_before_plan_mb": rss0,
        "metrics": {k: rep[k] for k in ("PR", "DBR", "ABR", "CR", "num_steps", "num_dropped")},
        "per_group": [{k: g[k] for k in ("pack_length", "cp", "PR", "DBR", "ABR")} for g in rep["per_group"]],
        "balance": balance_summary(plan),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scales", type=float, nargs="+", default=[1.0, 10.0], help="tulu3_longcite size multipliers"
    )
    p.add_argument("--config", default="configs/plan_hbp_16k_128k.yaml", help="plan config")
    p.add_argument("--dist", default="tulu3_longcite", help="synthetic distribution (tools/synth_lengths.py)")
    p.add_argument("--repeat", type=int, default=1, help="runs per scale; the table shows the fastest (CPU)")
    p.add_argument("--cpu", type=int, default=0, help="core to pin the child to (-1: no pinning)")
    p.add_argument("--child", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = None if a.cpu < 0 else a.cpu
    if a.child is not None:
        print(json.dumps(child(a.child, a.config, cpu, a.dist)))
        return 0
    results = []
    for scale in a.scales:
        runs = []
        for _ in range(a.repeat):
            cmd = [sys.executable, __file__, "--child", str(scale), "--config", a.config, "--dist", a.dist]
            cmd += ["--cpu", str(a.cpu)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        results.append(min(runs, key=lambda r: r["cpu"]["total"]))
    cols = [*STAGES, "metrics", "plan", "total"]
    print(f"planner benchmark: {a.dist}, config {a.config}, one core (pinned: {cpu is not None})")
    print()
    print("| samples | time | " + " | ".join(cols) + " | peak RSS MB |")
    print("|---" * (len(cols) + 3) + "|")
    for r in results:
        for kind in ("cpu", "wall"):
            cells = " | ".join(f"{r[kind][c]:.3f}" for c in cols)
            rss = (
                f"{r['peak_rss_mb']:.0f}" if kind == "cpu" else f"(before plan {r['rss_before_plan_mb']:.0f})"
            )
            print(f"| {r['num_samples']:,} | {kind} s | {cells} | {rss} |")
    print()
    print(
        "| samples | group | PR | DBR | ABR | sort max/mean (l^2) | lpt max/mean (l^2) | sort (cost) | lpt (cost) |"
    )
    print("|---" * 9 + "|")
    for r in results:
        for gi, g in enumerate(r["per_group"]):
            b = r["balance"].get(str(gi), {})
            bs, bl = b.get("sort", {}), b.get("lpt", {})
            print(
                f"| {r['num_samples']:,} | {g['pack_length'] // 1024}K cp{g['cp']} | {g['PR']:.6f} | {g['DBR']:.6f} | "
                f"{g['ABR']:.6f} | {bs.get('attn', float('nan')):.6f} | {bl.get('attn', float('nan')):.6f} | "
                f"{bs.get('cost', float('nan')):.6f} | {bl.get('cost', float('nan')):.6f} |"
            )
    print()
    for r in results:
        m = r["metrics"]
        print(
            f"{r['num_samples']:,} samples: PR {m['PR']:.6f} DBR {m['DBR']:.6f} ABR {m['ABR']:.6f} CR {m['CR']:.4f} "
            f"steps {m['num_steps']} dropped {m['num_dropped']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
