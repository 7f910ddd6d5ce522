"""Single-GPU training benchmark: HBP plan vs a single-group ISF plan over the same samples.

Trains a ~1B LLaMA-shaped model (preset ``llama_1b``) with 16K-32K tokens per micro-batch on the
embedded demo data (long documents truncated to the largest pack; ``--max-samples`` keeps the
first N lines of the shuffled demo file), once with an HBP plan (two groups: 16K packs without
recompute, 32K packs with recompute, balanced) and once with an ISF plan (one 32K group,
recompute everywhere, no balancing), through the same trainer (``megatron_hbp.mcore.loop.run``), each training in a process of its own.

Both plans cover exactly the same samples (``last_step: shrink``, nothing too long after the
truncation) and each runs to its end, so the comparison is over the same tokens: total tokens,
total step time, tokens/s = total tokens / total time, time-weighted MFU, peak memory. (Comparing
the first N steps would not be: HBP's curriculum puts the short group first.) Before the timed
runs, ``--warmup`` untimed steps of the ISF plan warm up CUDA and the allocator. Writes
``OUT/bench.json``.

    python tools/bench_train_gpu.py                 # on one GPU (bf16), the whole demo data
    python tools/bench_train_gpu.py --cpu-smoke     # tiny model, small packs, 40 samples, CPU
    python tools/bench_train_gpu.py --compare-layer-kernels   # + HBP plan with torch vs Triton layers

``--compare-layer-kernels`` (GPU only) also trains the HBP plan twice more, with
``layer_kernels: torch`` (Megatron's unfused local-spec norm / GLU / RoPE) and ``layer_kernels:
triton`` (megatron_hbp.kernels), each in its own process, and prints the time-weighted MFU and
tokens/s per plan group for both (``OUT/bench.json`` key ``layer_kernels``).

Needs megatron-core 0.19.2 in the environment (ENVIRONMENT.md: carried as a wheel on the GPU
machine). Prints a table and never asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def build_inputs(
    out: Path, max_length: int, hbp_groups: list[dict], isf_groups: list[dict], tokens_per_step: int,
    max_samples: int | None = None,
):  # fmt: skip
    """Sample info of the demo data (its first ``max_samples`` lines) and the two plan files
    (world size 1), both over every sample."""
    from megatron_hbp.data import preprocess
    from megatron_hbp.data.demo import ensure_demo_data
    from megatron_hbp.data.sample_info import load_sample_info
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    out.mkdir(parents=True, exist_ok=True)
    data = ensure_demo_data()
    if max_samples is not None:
        with open(data) as f:
            lines = [line for _, line in zip(range(max_samples), f)]
        data = out / "data.jsonl"
        data.write_text("".join(lines))
    info_path = out / "sample_info.npz"
    preprocess(data, info_path, template="llama3", max_length=max_length, workers=4, progress=False)
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
            last_step="shrink",  # world size 1: the leftover packs become one smaller step, none dropped
            too_long="drop",
            seed=0,
        )
        plan = build_plan(info.lengths, info.loss_tokens, cfg, fingerprint=info.fingerprint)
        plans[name] = plan.save(out / f"plan_{name}.npz")
        dropped = len(plan.dropped.indices)
        print(
            f"[bench] plan {name}: {plan.num_steps} steps, groups {[g['pack_length'] for g in groups]}, "
            f"{len(info.lengths) - dropped} of {len(info.lengths)} samples ({dropped} dropped)",
            flush=True,
        )
    return info_path, plans


def summarize(recs: list[dict]) -> dict:
    """Totals of one whole plan run from its metric records."""
    time_s = sum(r["step_time_s"] for r in recs)
    return {
        "steps": len(recs),
        "tokens": sum(int(r["tokens"]) for r in recs),
        "loss_tokens": sum(int(r["loss_tokens"]) for r in recs),
        "time_s": time_s,
        "tokens_per_s": sum(int(r["tokens"]) for r in recs) / time_s if time_s > 0 else 0.0,
        # time-weighted: total model FLOPs / (total time * peak)
        "mfu": sum((r.get("mfu") or 0.0) * r["step_time_s"] for r in recs) / time_s if time_s > 0 else 0.0,
        "peak_mem_gb": max((r.get("peak_mem_gb") or 0.0) for r in recs),
        "groups": sorted({r["group"] for r in recs}),
    }


def summarize_groups(recs: list[dict]) -> dict:
    """``summarize`` per plan group (group id -> totals)."""
    return {g: summarize([r for r in recs if r["group"] == g]) for g in sorted({r["group"] for r in recs})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", help="model preset")
    p.add_argument(
        "--max-samples", type=int, default=None, help="first N lines of the demo data (default: all)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed ISF steps before the timed runs")
    p.add_argument("--out", default="runs/bench_train", help="output folder")
    p.add_argument("--attention-backend", default="auto", help="auto / te / varlen / sdpa")
    p.add_argument(
        "--loss-impl", default="auto", help="auto / fused / megatron (see megatron_hbp.mcore.loss)"
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 1K/2K packs, 40 samples on CPU")
    p.add_argument(
        "--compare-layer-kernels",
        action="store_true",
        help="also train the HBP plan with layer_kernels torch and triton; MFU per group (GPU only)",
    )
    a = p.parse_args(argv)
    if a.compare_layer_kernels and a.cpu_smoke:
        p.error("--compare-layer-kernels needs a GPU (the Triton layers on CPU only run interpreted)")

    import torch

    if a.cpu_smoke:
        model, max_samples, warmup = "tiny", a.max_samples or 40, 1
        hbp = [{"pack_length": 1024, "recompute_layers": 0}, {"pack_length": 2048, "recompute_layers": 1}]
        isf = [{"pack_length": 2048, "recompute_layers": 1}]
        tokens_per_step, max_length, dtype = 4096, 2048, "fp32"
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        model, max_samples, warmup = a.model, a.max_samples, a.warmup
        hbp = [{"pack_length": 16384, "recompute_layers": 0}, {"pack_length": 32768, "recompute_layers": 8}]
        isf = [{"pack_length": 32768, "recompute_layers": 8}]
        tokens_per_step, max_length, dtype = 131072, 32768, "bf16"

    out = Path(a.out)
    info_path, plans = build_inputs(out, max_length, hbp, isf, tokens_per_step, max_samples)

    # Each training runs in a process of its own (as a user's job would): nothing of an earlier
    # run (model, optimizer, allocator cache) stays on the GPU and inflates the next one's memory.
    def train(name: str, max_steps: int | None, metrics: bool, layer_kernels: str = "auto") -> list[dict]:
        tag = name if layer_kernels == "auto" else f"{name}_{layer_kernels}"
        cfg = {
            "model": model,
            "data": {"sample_info": str(info_path), "num_workers": 2},
            "plan": {"path": str(plans[name])},
            "optimizer": {"lr": 1e-5, "warmup_steps": 2},
            "max_steps": max_steps,
            "dtype": dtype,
            "attention_backend": a.attention_backend,
            "loss_impl": a.loss_impl,
            "layer_kernels": layer_kernels,
            "metrics_file": str(out / f"metrics_{tag}.jsonl") if metrics else None,
        }
        code = (
            "import json, sys\n"
            "from megatron_hbp.configio import from_dict\n"
            "from megatron_hbp.mcore.config import TrainConfig\n"
            "from megatron_hbp.mcore.loop import run\n"
            "run(from_dict(TrainConfig, json.loads(sys.argv[1])))\n"
        )
        if metrics:
            Path(cfg["metrics_file"]).unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], check=False)
        if proc.returncode != 0:
            raise SystemExit(
                f"[bench] the {tag} training exited with {proc.returncode} (its output is above)"
            )
        if not metrics:
            return []
        return [
            json.loads(line) for line in Path(cfg["metrics_file"]).read_text().splitlines() if line.strip()
        ]

    if warmup > 0:
        train("isf", warmup, metrics=False)
    results = {name: summarize(train(name, None, metrics=True)) for name in ("hbp", "isf")}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nmodel {model}, whole plans over the same samples, device {device}")
    print("| plan | steps | tokens | total time (s) | tokens/s | MFU | peak mem (GB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['steps']} | {r['tokens']} | {r['time_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['mfu'] * 100:.1f}% | {r['peak_mem_gb']:.1f} |"
        )
    same = results["hbp"]["tokens"] == results["isf"]["tokens"]
    if not same:
        print(
            "WARNING: the two plans trained different numbers of tokens; the ratio below is not like for like"
        )
    if results["isf"]["tokens_per_s"] > 0:
        print(
            f"HBP / ISF throughput over the same {results['hbp']['tokens']} tokens: "
            f"{results['hbp']['tokens_per_s'] / results['isf']['tokens_per_s']:.2f}x "
            f"(total time {results['hbp']['time_s']:.1f} s vs {results['isf']['time_s']:.1f} s)"
        )
    by_kernels = {}
    if a.compare_layer_kernels:
        for lk in ("torch", "triton"):
            by_kernels[lk] = summarize_groups(train("hbp", None, metrics=True, layer_kernels=lk))
        print(f"\nHBP plan, torch vs Triton layer kernels (same run, device {device})")
        print("| group | layers | steps | tokens/s | MFU |")
        print("|---|---|---|---|---|")
        for g in by_kernels["torch"]:
            for lk in ("torch", "triton"):
                r = by_kernels[lk].get(g)
                if r:
                    print(f"| {g} | {lk} | {r['steps']} | {r['tokens_per_s']:.0f} | {r['mfu'] * 100:.1f}% |")
    (out / "bench.json").write_text(
        json.dumps(
            {
                "device": device,
                "model": model,
                "same_tokens": same,
                "results": results,
                "layer_kernels": {lk: {str(g): r for g, r in v.items()} for lk, v in by_kernels.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
