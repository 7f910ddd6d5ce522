#!/usr/bin/env python
"""Choose HBP groups (pack length, CP degree, recomputed layers) for a model, a cluster and a data
set, print the candidates table (like the paper's Table 19), and write a plan config for tools/plan.py.

  python tools/select_groups.py --synth tulu3_longcite --output configs/plan_selected.yaml
  python tools/select_groups.py --lengths cache/tulu3_longcite.npy --model llama3_1_8b --gpu h100_sxm --num-gpus 32
  python tools/select_groups.py --sample-info cache/demo/sample_info.npz --model llama_1b --num-gpus 8 --method paper

Two selections over the same candidates (megatron_hbp/costmodel/select.py):
  paper      the paper's Algorithms 1, 3, 4: the fastest length per token (l_best), the length the
             longest sample needs (l_max), plus CP-1 subgroups l_best/sp_best and l_max/sp_max.
  simulated  ours: every subset of candidate lengths (with l_max) is planned on the real lengths
             (a subsample) and its epoch simulated.
Then the paper's set and the search's best sets (--evaluate-top) are scored again on the full
data by the same function (same packer, last-step policy and balancer; GPU-hours per trained token
x all tokens) and the fastest of that evaluation is written (within --tolerance: fewest groups);
--method paper writes the paper's set instead. A set that leaves a group with no step is flagged
and never written (exit 2 if that is all there is). The profiler is the analytic cost model (no
GPU needed) on a code-path profile (--profile, default trainer_h100: this trainer's path
calibrated on an H100; te: a Transformer Engine path); the banner names it and the CP backend.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from megatron_hbp.configio import ConfigError, to_dict
from megatron_hbp.costmodel.cli import (
    add_cluster_args,
    add_input_args,
    build_cost_model,
    describe,
    describe_profile,
    parse_int_list,
    read_inputs,
)
from megatron_hbp.costmodel.profiler import AnalyticProfiler
from megatron_hbp.costmodel.select import (
    DEFAULT_CP,
    DEFAULT_LENGTHS,
    evaluate_group_set,
    format_candidates,
    format_groups,
    pick_fastest,
    plan_config_for,
    select_groups_paper,
    select_groups_simulated,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(p)
    add_cluster_args(p)
    p.add_argument(
        "--candidate-lengths",
        default=",".join(str(x) for x in DEFAULT_LENGTHS),
        help="candidate pack lengths (default 8K..128K)",
    )
    p.add_argument(
        "--cp", default=",".join(str(x) for x in DEFAULT_CP), help="candidate CP degrees (1,2,4,8)"
    )
    p.add_argument(
        "--tokens-per-step", type=int, default=2097152, help="global tokens per step of the plans (2097152)"
    )
    p.add_argument("--method", choices=("simulated", "paper"), default="simulated", help="groups to write")
    p.add_argument("--search-sample", type=int, default=200_000, help="samples used by the simulated search")
    p.add_argument(
        "--tolerance", type=float, default=0.01, help="simulated search: prefer fewer groups within"
    )
    p.add_argument(
        "--evaluate-top",
        type=int,
        default=5,
        help="search's best valid sets re-scored on the full data, besides the paper's (default 5)",
    )
    p.add_argument(
        "--no-evaluate",
        action="store_true",
        help="skip the full-data evaluation: write the search's choice as scored on its subsample",
    )
    p.add_argument("--output", type=Path, help="write the chosen plan config (YAML) here")
    a = p.parse_args(argv)
    try:
        lengths, loss, desc = read_inputs(a)
        cm = build_cost_model(a)
        cands = parse_int_list(a.candidate_lengths)
        cps = parse_int_list(a.cp)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"data: {desc}: {len(lengths)} samples, {int(lengths.sum()):,} tokens, max {int(lengths.max())}")
    print(describe_profile(cm, a.path_profile))
    print(describe(cm))
    prof = AnalyticProfiler(cm)
    W = cm.dp_cp_ranks
    t0 = time.perf_counter()
    try:
        sel = select_groups_paper(
            prof, lengths, world_size=W, candidate_lengths=cands, cp_degrees=cps, seed=a.seed
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tpg = max(cands) // max(cps)
    print(f"\nCandidates (analytic profile, packs drawn from the data, {tpg} tokens per GPU each):")
    print(format_candidates(sel))
    print(f"\nAlgorithm 1: l_best = {sel.l_best // 1024}K, l_max = {sel.l_max // 1024}K")
    for n in sel.notes:
        print(f"  {n}")
    print(f"paper groups:     {format_groups(sel.groups)}   ({time.perf_counter() - t0:.1f} s)")
    plan_kwargs = dict(
        packer="bfd", greedy_fill=True, balance="lpt", cost_linear_coef=cm.balance_linear_coef()
    )
    t1 = time.perf_counter()
    chosen, scored = select_groups_simulated(
        sel,
        prof,
        lengths,
        cm,
        tokens_per_step=a.tokens_per_step,
        sample=a.search_sample,
        tolerance=a.tolerance,
        seed=a.seed,
        progress=True,
        **plan_kwargs,
    )
    n_sub = min(len(lengths), a.search_sample or len(lengths))
    print(
        f"\nSimulated search over {len(scored)} group sets on {n_sub} samples ({time.perf_counter() - t1:.1f} s):"
    )
    print("| groups | GPU-hours (search data) | samples dropped | steps per group |\n|---|---|---|---|")
    for sc in scored[:8]:
        flag = "" if sc.valid else " (a group gets no step)"
        print(
            f"| {format_groups(sc.groups)} | {sc.hours:.3f} | {sc.result.num_dropped} | "
            f"{', '.join(map(str, sc.group_steps))}{flag} |"
        )
    print(
        f"search's choice: {format_groups(chosen) if chosen else 'none (every set leaves a group without steps)'}"
    )
    if a.no_evaluate:
        final = [sc for sc in scored if chosen is not None and sc.groups == chosen]
        paper_score = next((sc for sc in scored if sc.groups == list(sel.groups)), None)
    else:
        # the paper's set and the search's best valid sets, scored by the same function on all samples
        cands, seen = [("paper (Alg. 1)", list(sel.groups))], {tuple(sel.groups)}
        if chosen is not None and tuple(chosen) not in seen:
            seen.add(tuple(chosen))
            cands.append(("search's choice", list(chosen)))
        added = 0
        for rank, sc in enumerate(scored, 1):
            if added >= a.evaluate_top:
                break
            if sc.valid and tuple(sc.groups) not in seen:
                seen.add(tuple(sc.groups))
                cands.append((f"search rank {rank}", sc.groups))
                added += 1
        final = [
            evaluate_group_set(gs, lengths, cm, tokens_per_step=a.tokens_per_step, seed=a.seed, **plan_kwargs)
            for _, gs in cands
        ]
        paper_score = final[0]
        print(f"\nFull-data evaluation ({len(lengths)} samples, same packer, last-step policy and balancer):")
        print(
            "| candidate | groups | ABR | CR | GPU-hours | dropped | steps per group | score h | vs paper rule |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        for (name, _), sc in zip(cands, final):
            r = sc.result
            note = "" if sc.valid else " (a group gets no step)"
            print(
                f"| {name} | {format_groups(sc.groups)} | {r.abr:.3f} | {r.cr:.3f} | {r.gpu_hours:.3f} | "
                f"{r.num_dropped} | {', '.join(map(str, sc.group_steps))}{note} | {sc.hours:.3f} | "
                f"{paper_score.hours / sc.hours:.2f}x |"
            )
    if a.method == "paper":
        best = paper_score if paper_score is not None and paper_score.valid else None
        if paper_score is not None and not paper_score.valid:
            print(
                "error: the paper's set leaves group(s) "
                f"{format_groups(paper_score.empty_groups)} without any step on this data; not written "
                "(use --method simulated, fewer candidate lengths, or a smaller --tokens-per-step)",
                file=sys.stderr,
            )
            return 2
        groups = sel.groups
    else:
        best = pick_fastest(final, a.tolerance)
        if best is None:
            print(
                "error: every evaluated group set leaves a group without any step on this data "
                "(--tokens-per-step too large for it?); nothing written",
                file=sys.stderr,
            )
            return 2
        groups = best.groups
    print(
        f"\nchosen ({a.method}): {format_groups(groups)}" + (f", {best.hours:.3f} GPU-hours" if best else "")
    )
    if a.output:
        cfg = plan_config_for(groups, W, a.tokens_per_step, seed=a.seed, **plan_kwargs)
        d = to_dict(cfg)
        d["extra"] = {
            "selected_by": f"tools/select_groups.py --method {a.method}",
            "model": cm.model.name,
            "cluster": f"{cm.num_gpus} x {cm.hardware.name}",
            "profile": a.path_profile.name,
            "cp_impl": cm.setup.cp_impl,
            "data": desc,
        }
        if best is not None:
            d["extra"]["simulated_gpu_hours"] = round(best.hours, 4)
            d["extra"]["evaluated_on"] = "search subsample" if a.no_evaluate else "all samples"
        a.output.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Written by tools/select_groups.py ({a.method} selection); use with tools/plan.py --config.\n"
        )
        a.output.write_text(header + yaml.safe_dump(d, sort_keys=False))
        print(f"\nwrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
