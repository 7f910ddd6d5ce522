#!/usr/bin/env python
"""Build an HBP training plan (groups, packs, balanced steps) and report its metrics.

Examples:
  python tools/plan.py --sample-info cache/demo/sample_info.npz --config configs/plan_demo.yaml --output runs/plan
  python tools/synth_lengths.py tulu3_longcite --output cache/tulu3_longcite.npy
  python tools/plan.py --lengths cache/tulu3_longcite.npy --config configs/plan_hbp_16k_128k.yaml --output runs/hbp --plot
  python tools/plan.py --lengths cache/tulu3_longcite.npy --compare configs/plan_isf_128k.yaml configs/plan_hbp_16k_128k.yaml
  python tools/plan.py --lengths x.npy --config configs/plan_hbp_16k_128k.yaml --dry-run
  python tools/plan.py --indexed data/my_megatron_text_document --config configs/plan_hbp_16k_128k.yaml --output runs/p
  python tools/plan.py --lengths x.npy --compare configs/plan_hbp_16k_128k.yaml:balance=none,name=no_bal ...

A config may carry overrides after a colon: PATH:key=value,key=value (YAML values); the special
key name=... only sets the column title in --compare.

Writes DIR/plan.npz (load with megatron_hbp.load_plan), DIR/report.json, DIR/report.md and,
with --plot, DIR/lengths_hist.png, DIR/balance.png, DIR/steps.png. Metric definitions: docs/planner.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from megatron_hbp.configio import ConfigError, to_dict
from megatron_hbp.planner import build_plan, group_data, load_plan_config
from megatron_hbp.planner.build import PlanInputError
from megatron_hbp.planner.config import parse_overrides
from megatron_hbp.planner.io import read_lengths, read_sample_info
from megatron_hbp.planner.report import (
    compare_table,
    plot_balance,
    plot_length_histogram,
    plot_steps,
    report_markdown,
    write_report,
)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sample-info", type=Path, help="sample-info .npz (lengths, loss_tokens, fingerprint)")
    src.add_argument("--lengths", type=Path, help=".npy of per-sample lengths (loss tokens = lengths)")
    src.add_argument(
        "--indexed",
        metavar="PREFIX",
        help="an existing Megatron IndexedDataset (PREFIX.idx/.bin): one sample per document, lengths "
        "from the .idx; every token a loss token unless --loss-mask is given",
    )
    p.add_argument(
        "--loss-mask",
        metavar="PREFIX",
        help="with --indexed: IndexedDataset of the loss mask (nonzero = loss)",
    )
    p.add_argument(
        "--config", type=str, help="plan YAML (configs/plan_*.yaml), optionally PATH:key=value,..."
    )
    p.add_argument("--output", type=Path, help="output directory (plan.npz, report.json, report.md)")
    p.add_argument(
        "--compare", type=str, nargs="+", metavar="CFG", help="plan several configs, print them side by side"
    )
    p.add_argument("--plot", action="store_true", help="also write PNG plots into --output")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and group sizes, plan nothing"
    )
    p.add_argument("--json", action="store_true", help="print report.json instead of the markdown report")
    a = p.parse_args(argv)
    if a.loss_mask and not a.indexed:
        p.error("--loss-mask goes with --indexed PREFIX")
    if not a.compare and not a.config:
        p.error("--config is required (or use --compare CFG...)")
    if not a.compare and not a.dry_run and not a.output:
        p.error("--output DIR is required to build a plan")
    return a


def _load(spec: str):
    """``PATH[:key=value,...]`` -> (name, PlanConfig)."""
    path, _, over = spec.partition(":")
    overrides = parse_overrides(over)
    name = overrides.pop("name", None) or Path(path).stem
    return str(name), load_plan_config(path, overrides)


def _dry_run(cfg, lengths) -> str:
    pls = [g.pack_length for g in cfg.groups]
    gid = group_data(lengths, pls)
    counts = np.bincount(gid, minlength=len(pls) + 1)
    toks = np.bincount(gid, weights=lengths.astype(np.float64), minlength=len(pls) + 1)
    lines = ["resolved config:", json.dumps(to_dict(cfg), indent=2), "", "groups:"]
    for i, g in enumerate(cfg.groups):
        lines.append(
            f"  [{i}] pack_length={g.pack_length} cp={g.cp} recompute_layers={g.recompute_layers} "
            f"replicas={cfg.replicas(i)} micro_batches={cfg.micro_batches(i)} "
            f"tokens/GPU/micro-batch={g.pack_length // g.cp}: {counts[i]} samples, {int(toks[i])} tokens (own)"
        )
    lines.append(f"  longer than every group: {counts[-1]} samples (too_long: {cfg.too_long})")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _args(argv)
    try:
        if a.sample_info:
            lengths, loss, fp = read_sample_info(a.sample_info)
        elif a.indexed:
            from megatron_hbp.data.token_files import read_indexed

            lengths, loss = read_indexed(a.indexed, a.loss_mask)
            fp = None
        else:
            lengths = read_lengths(a.lengths)
            loss, fp = None, None
        if a.compare:
            cfgs = [_load(c) for c in a.compare]
            if a.dry_run:
                for name, cfg in cfgs:
                    print(f"== {name}\n{_dry_run(cfg, lengths)}\n")
                return 0
            reports = []
            for name, cfg in cfgs:
                plan = build_plan(lengths, loss, cfg, fingerprint=fp)
                out = (a.output / name) if a.output else None
                if out:
                    plan.save(out / "plan.npz")
                    rep = write_report(plan, out, title=name)
                    if a.plot:
                        plot_balance(plan, out / "balance.png")
                else:
                    from megatron_hbp.planner.report import build_report

                    rep = build_report(plan)
                reports.append((name, rep))
                print(
                    f"planned {name}: {rep['num_steps']} steps in {rep['plan_seconds']:.2f} s",
                    file=sys.stderr,
                )
            print(compare_table(reports), end="")
            return 0
        name, cfg = _load(a.config)
        if a.dry_run:
            print(_dry_run(cfg, lengths))
            return 0
        plan = build_plan(lengths, loss, cfg, fingerprint=fp)
        if plan.num_steps == 0:
            print(
                "warning: the plan has no steps (every sample dropped, or fewer packs than one step); "
                "see dropped_by_reason in report.json",
                file=sys.stderr,
            )
        warning = plan.stats["drops"]["warning"]
        if warning:
            print(warning, file=sys.stderr)
        path = plan.save(a.output / "plan.npz")
        rep = write_report(plan, a.output, title=f"Plan report: {name}")
        if a.plot:
            plot_length_histogram(lengths, [g.pack_length for g in cfg.groups], a.output / "lengths_hist.png")
            plot_balance(plan, a.output / "balance.png")
            plot_steps(plan, a.output / "steps.png")
        print(json.dumps(rep, indent=2) if a.json else report_markdown(rep, f"Plan report: {name}"), end="")
        sys.stdout.flush()
        print(f"wrote {path}, {a.output / 'report.json'}, {a.output / 'report.md'}", file=sys.stderr)
        return 0
    except (ConfigError, PlanInputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
