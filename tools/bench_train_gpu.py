"""Single-GPU training benchmark: HBP plan vs a single-group ISF plan of the same data.

Trains a ~1B LLaMA-shaped model (preset ``llama_1b``) for ``--steps`` steps with 16K-32K tokens
per micro-batch on the embedded demo data (long documents truncated to the largest pack), once
with an HBP plan (two groups: 16K packs without recompute, 32K packs with recompute, balanced)
and once with an ISF plan (one 32K group, recompute everywhere, no balancing), through the same
trainer (``megatron_hbp.mcore.train.run``). Prints tokens/s, MFU and peak memory (medians over
the steps after ``--warmup``) and writes ``OUT/bench.json``.

    python tools/bench_train_gpu.py                 # on one GPU (bf16), ~20 steps per plan
    python tools/bench_train_gpu.py --cpu-smoke     # tiny model, small packs, CPU: checks the script

Needs megatron-core 0.19.2 in the environment (ENVIRONMENT.md: carried as a wheel on the GPU
machine). Prints a table and never asserts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def build_inputs(
    out: Path, max_length: int, hbp_groups: list[dict], isf_groups: list[dict], tokens_per_step: int
):
    """Sample info of the demo data and the two plan files (world size 1)."""
    from megatron_hbp.data import preprocess
    from megatron_hbp.data.demo import ensure_demo_data
    from megatron_hbp.data.sample_info import load_sample_info
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "sample_info.npz"
    preprocess(
        ensure_demo_data(), info_path, template="llama3", max_length=max_length, workers=4, progress=False
    )
    info = load_sample_info(info_path)
    plans = {}
    for name, groups, packer, balance in (
        ("hbp", hbp_groups, "bfd", "lpt"),
        ("isf", isf_groups, "isf", "none"),
    ):
        cfg = PlanConfig(
            groups=[GroupConfig(**g) for g in groups],
            world_size=1,
            tokens_per_step=tokens_per_step,
            packer=packer,
            greedy_fill=name == "hbp",
            balance=balance,
            last_step="drop",
            too_long="drop",
            seed=0,
        )
        plan = build_plan(info.lengths, info.loss_tokens, cfg, fingerprint=info.fingerprint)
        plans[name] = plan.save(out / f"plan_{name}.npz")
        print(
            f"[bench] plan {name}: {plan.num_steps} steps, groups {[g['pack_length'] for g in groups]}",
            flush=True,
        )
    return info_path, plans


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", help="model preset")
    p.add_argument("--steps", type=int, default=20, help="training steps per plan")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    p.add_argument("--out", default="runs/bench_train", help="output folder")
    p.add_argument("--attention-backend", default="auto", help="auto / te / varlen / sdpa")
    p.add_argument(
        "--loss-impl", default="auto", help="auto / fused / megatron (see megatron_hbp.mcore.loss)"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 1K/2K packs, 4 steps on CPU")
    a = p.parse_args(argv)

    import torch

    if a.cpu_smoke:
        model, steps, warmup = "tiny", 4, 1
        hbp = [{"pack_length": 1024, "recompute_layers": 0}, {"pack_length": 2048, "recompute_layers": 1}]
        isf = [{"pack_length": 2048, "recompute_layers": 1}]
        tokens_per_step, max_length, dtype = 4096, 2048, "fp32"
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        model, steps, warmup = a.model, a.steps, a.warmup
        hbp = [{"pack_length": 16384, "recompute_layers": 0}, {"pack_length": 32768, "recompute_layers": 8}]
        isf = [{"pack_length": 32768, "recompute_layers": 8}]
        tokens_per_step, max_length, dtype = 131072, 32768, "bf16"

    out = Path(a.out)
    info_path, plans = build_inputs(out, max_length, hbp, isf, tokens_per_step)

    from megatron_hbp.mcore.config import DataConfig, OptimizerConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import init_distributed, run

    init_distributed()
    results = {}
    for name, plan_path in plans.items():
        cfg = TrainConfig(
            model=model,
            data=DataConfig(sample_info=str(info_path), num_workers=2),
            plan=PlanSource(path=str(plan_path)),
            optimizer=OptimizerConfig(lr=1e-5, warmup_steps=2),
            max_steps=steps,
            dtype=dtype,
            attention_backend=a.attention_backend,
            loss_impl=a.loss_impl,
            metrics_file=str(out / f"metrics_{name}.jsonl"),
        )
        recs = run(cfg)
        body = recs[warmup:] or recs
        results[name] = {
            "steps": len(recs),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in body),
            "mfu": statistics.median(r.get("mfu") or 0.0 for r in body),
            "peak_mem_gb": max(r.get("peak_mem_gb") or 0.0 for r in recs),
            "step_time_s": statistics.median(r["step_time_s"] for r in body),
            "groups": sorted({r["group"] for r in recs}),
        }
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nmodel {model}, {steps} steps per plan, medians after {warmup} warm-up steps, device {device}")
    print("| plan | tokens/s | MFU | peak mem (GB) | step time (s) |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['mfu'] * 100:.1f}% | {r['peak_mem_gb']:.1f} | {r['step_time_s']:.2f} |"
        )
    if "hbp" in results and "isf" in results and results["isf"]["tokens_per_s"] > 0:
        print(f"HBP / ISF throughput: {results['hbp']['tokens_per_s'] / results['isf']['tokens_per_s']:.2f}x")
    (out / "bench.json").write_text(
        json.dumps({"device": device, "model": model, "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
