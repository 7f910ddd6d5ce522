"""Recompute trade-off and cost-model calibration, measured on one GPU.

Runs real training iterations (``megatron_hbp.mcore.profiler.MeasuredProfiler``: the trainer's
Megatron GPTModel, DDP with the fp32 gradient buffer, Megatron Adam, bf16, the trainer's loss)
over the cost model's calibration grid: pack lengths 4K/8K/16K/32K, each with 0, half and all
layers recomputed, packs drawn from a synthetic SFT length mix (``planner.synth``) so every
setting processes about ``--tokens`` tokens. Prints

1. every setting: median forward+backward time, tokens/s, measured peak memory
   (``torch.cuda.max_memory_allocated``, optimizer step included) next to the cost model's
   modelled tensors for the trainer's path (``train.trainer_cost_model``; the modelled
   allocator reserve is left out since ``max_memory_allocated`` does not see it) and the
   uncalibrated modelled time;
2. the recompute trade-off at the longest pack (time and memory relative to no recompute);
3. the efficiencies ``costmodel.calibrate`` fits to the points, with the hold-out error
   (every third point predicted by a fit on the others).

Writes ``--json``. ``--cpu-smoke`` runs the same path with the tiny preset, fp32 and short
packs on CPU (times from the host clock, no memory numbers). Prints tables, never asserts.

    python tools/bench_recompute_gpu.py                 # ~1B model (llama_1b), one GPU
    python tools/bench_recompute_gpu.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

GIB = 1024**3


def _hardware_name(device_name: str) -> str:
    return "h200" if "H200" in device_name else "h100_sxm"


def refit(paths: list[str]) -> int:
    """Fit the cost model to the fitting rows of earlier runs (their ``pack_docs``); no GPU."""
    from megatron_hbp.costmodel import CalibrationPoint
    from megatron_hbp.costmodel.profiler import calibrate
    from megatron_hbp.mcore.memory import trainer_cost_model
    from megatron_hbp.model_config import load_model_config

    runs = [json.loads(Path(x).read_text()) for x in paths]
    keys = {(r["model"], r["device"], r["attention_backend"]) for r in runs}
    if len(keys) != 1:
        raise SystemExit(
            f"--refit: the files mix models/devices/backends {sorted(keys)}; fit them separately"
        )
    model, device_name, backend = keys.pop()
    cm = trainer_cost_model(
        load_model_config(model), world=1, attention_backend=backend, hardware=_hardware_name(device_name)
    )
    points, skipped = [], 0
    for r in runs:
        for x in r["rows"]:
            if x.get("oom") or "pack_docs" not in x:
                skipped += 1
                continue
            packs = [np.asarray(d, np.int64) for d in x["pack_docs"]]
            points.append(CalibrationPoint(packs, x["pack_length"], 1, x["recompute_layers"], x["time_s"]))
    if not points:
        raise SystemExit("--refit: no measured row with pack_docs in these files")
    rep = calibrate(cm, points)
    e = rep.efficiency
    print(
        f"{model} on {device_name} ({backend}): {len(points)} points fitted, {skipped} rows skipped (OOM / no packs)"
    )
    print(
        f"dense_mfu {e.dense_mfu:.3f}, attention_mfu {e.attention_mfu:.3f}, overhead "
        f"{e.microbatch_overhead_s * 1e3:.2f} ms/micro-batch; fit RMS error {rep.rms_relative_error * 100:.1f} %, "
        f"max {rep.max_relative_error * 100:.1f} %"
    )
    print("| pack length | docs | recomputed layers | measured (ms) | fitted (ms) | error |")
    print("|---|---|---|---|---|---|")
    for pt, pred in zip(points, rep.predicted_s):
        print(
            f"| {pt.pack_length} | {sum(len(x) for x in pt.packs)} | {pt.recompute_layers} | {pt.time_s * 1e3:.1f} | "
            f"{pred * 1e3:.1f} | {(pred - pt.time_s) / pt.time_s * 100:+.1f} % |"
        )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_1b", help="model preset (default llama_1b, ~1.2B)")
    p.add_argument("--pack-lengths", default="4096,8192,16384,32768", help="comma-separated pack lengths")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per setting (packs of it)")
    p.add_argument("--data", default="tulu3_longcite", help="planner.synth length mix for the packs")
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per setting (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per setting")
    p.add_argument(
        "--extra-recompute", default="4,12", help="more recomputed-layer counts at the longest pack length"
    )
    p.add_argument(
        "--single-doc",
        action="store_true",
        help="packs of ONE document filling the pack (attention-heavy) instead of the synthetic mix",
    )
    p.add_argument(
        "--refit",
        nargs="+",
        metavar="JSON",
        help="no GPU: fit the cost model to the rows of earlier runs' JSON files (same model/device)",
    )
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--json", default="runs/bench_recompute.json", help="output file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 256/512 packs, fp32, on CPU")
    a = p.parse_args(argv)

    if a.refit:
        return refit(a.refit)

    import torch

    from megatron_hbp.costmodel import AnalyticProfiler, CalibrationPoint
    from megatron_hbp.costmodel.profiler import calibrate, calibration_settings, holdout_calibration
    from megatron_hbp.mcore.memory import trainer_cost_model
    from megatron_hbp.mcore.profiler import MeasuredProfiler
    from megatron_hbp.model_config import load_model_config
    from megatron_hbp.planner.synth import synth_lengths

    if a.cpu_smoke:
        model, lengths_cfg, tokens, device = "tiny", (256, 512), 1024, "cpu"
        backend = "sdpa"
    else:
        if not torch.cuda.is_available():
            print("no GPU: run with --cpu-smoke to check the script on CPU", file=sys.stderr)
            return 2
        model, lengths_cfg, tokens, device = (
            a.model,
            tuple(int(x) for x in a.pack_lengths.split(",")),
            a.tokens,
            "cuda",
        )
        backend = a.attention_backend
    model_cfg = load_model_config(model)
    lengths = synth_lengths(a.data, seed=0, scale=0.01)
    grid = calibration_settings(
        lengths, model_cfg.num_layers, pack_lengths=lengths_cfg, tokens_per_setting=tokens, seed=0
    )
    # per pack length the grid's {0, L/2, L} recomputed layers (plus --extra-recompute at the
    # longest), most recomputed first: a setting that does not fit (OOM) then comes last
    extra = [] if a.cpu_smoke else [int(x) for x in a.extra_recompute.split(",") if x]
    settings = []
    for length in lengths_cfg:
        packs = next(s[0] for s in grid if s[1] == length)
        if a.single_doc:
            packs = [np.array([length])] * max(1, tokens // length)
        ks = {s[3] for s in grid if s[1] == length}
        if length == max(lengths_cfg):
            ks |= {k for k in extra if 0 <= k <= model_cfg.num_layers}
        settings += [(packs, length, 1, k) for k in sorted(ks, reverse=True)]
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    prof = MeasuredProfiler(
        model_cfg, iterations=a.iterations, warmup=a.warmup, attention_backend=backend, device=device
    )
    print(
        f"[recompute] model {model} ({model_cfg.num_layers} layers), device {device_name}, "
        f"{len(settings)} settings of ~{tokens} tokens",
        flush=True,
    )

    from megatron_hbp.mcore.attention import select_backend
    from megatron_hbp.mcore.loss import resolve_loss_impl

    bf16 = device == "cuda"
    resolved = select_backend(backend, device, torch.bfloat16 if bf16 else torch.float32)

    def cost_model(attention_backend: str):
        return trainer_cost_model(
            model_cfg,
            world=1,
            bf16=bf16,
            attention_backend=attention_backend,
            fused_loss=resolve_loss_impl("auto", "step_token_mean") == "fused",
            hardware=_hardware_name(device_name),
        )

    cm = cost_model(resolved)
    # time model and calibration: AnalyticProfiler's memory check needs flash attention's
    # memory form (the CPU smoke's sdpa keeps per-document probabilities; its times are not fitted)
    cm_time = cm if resolved != "sdpa" else cost_model("varlen")
    analytic = AnalyticProfiler(cm_time)

    rows, points = [], []
    t0 = time.perf_counter()
    for packs, length, cp, k in settings:
        oom = None
        try:
            r = prof.profile(packs, length, cp, k)
        except torch.cuda.OutOfMemoryError as e:  # reported as a row, the grid goes on
            oom = str(e).splitlines()[0][:200]
        if oom is not None:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        else:
            points.append(
                CalibrationPoint(packs=packs, pack_length=length, cp=cp, recompute_layers=k, time_s=r.time_s)
            )
        pack_tokens = max(int(np.sum(x)) for x in packs)
        sum_sq = max(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in packs)
        mem = cm.memory(pack_tokens, 1, k, sum_sq_lengths=sum_sq)
        modelled = mem.total - mem.reserve
        tok = float(sum(int(np.sum(x)) for x in packs))
        nan = float("nan")
        rows.append(
            {
                "pack_length": length,
                "recompute_layers": k,
                "pack_docs": [[int(n) for n in x] for x in packs],
                "packs": len(packs),
                "docs": int(sum(len(x) for x in packs)),
                "tokens": int(tok),
                "oom": oom,
                "time_s": nan if oom else r.time_s,
                "tokens_per_s": nan if oom else tok / r.time_s,
                "peak_gib": nan if oom else r.peak_memory_bytes / GIB,
                "modelled_gib": modelled / GIB,
                "modelled_activations_gib": mem.activations / GIB,
                "analytic_time_s": analytic.profile(packs, length, cp, k).time_s,
            }
        )
        x = rows[-1]
        if oom:
            print(
                f"[recompute] {length:>6} tokens/pack, {k:>2} recomputed: OUT OF MEMORY ({oom})", flush=True
            )
            continue
        print(
            f"[recompute] {length:>6} tokens/pack, {k:>2} recomputed: {x['time_s'] * 1e3:8.1f} ms, "
            f"peak {x['peak_gib']:.2f} GiB (modelled {x['modelled_gib']:.2f})  [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )

    print(
        f"\nmodel {model}, device {device_name}, one micro-batch per pack, fwd+bwd median of {a.iterations}"
    )
    print(
        "| pack length | recomputed layers | packs | docs | tokens | time (ms) | tokens/s | peak GiB | modelled GiB | modelled time (ms, uncalibrated) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(
            f"| {x['pack_length']} | {x['recompute_layers']} | {x['packs']} | {x['docs']} | {x['tokens']} | "
            + (
                "OOM | — | OOM"
                if x["oom"]
                else f"{x['time_s'] * 1e3:.1f} | {x['tokens_per_s']:.0f} | {x['peak_gib']:.2f}"
            )
            + f" | {x['modelled_gib']:.2f} | {x['analytic_time_s'] * 1e3:.1f} |"
        )
    longest = max(lengths_cfg)
    fitting = [x for x in rows if x["pack_length"] == longest and not x["oom"]]
    base = min(fitting, key=lambda x: x["recompute_layers"]) if fitting else rows[-1]
    print(
        f"\nrecompute trade-off at {longest} tokens/pack (relative to {base['recompute_layers']} "
        f"layers recomputed, the fewest that fit)"
    )
    print("| recomputed layers | time | time × | peak GiB | peak − base (GiB) | activations modelled (GiB) |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        if x["pack_length"] == longest and x["oom"]:
            print(f"| {x['recompute_layers']} | OOM | — | OOM | — | {x['modelled_activations_gib']:.2f} |")
        elif x["pack_length"] == longest:
            print(
                f"| {x['recompute_layers']} | {x['time_s'] * 1e3:.1f} ms | {x['time_s'] / base['time_s']:.3f} | "
                f"{x['peak_gib']:.2f} | {x['peak_gib'] - base['peak_gib']:+.2f} | {x['modelled_activations_gib']:.2f} |"
            )

    if not points:
        print("nothing fitted in memory: no calibration")
        return 1
    report = calibrate(cm_time, points)
    eff = report.efficiency
    result = {
        "device": device_name,
        "model": model,
        "torch": torch.__version__,
        "attention_backend": resolved,
        "packs": "single document" if a.single_doc else f"synthetic {a.data} mix",
        "rows": rows,
        "calibrated_efficiency": {k: getattr(eff, k) for k in eff.__dataclass_fields__},
        "fit_rms_relative_error": report.rms_relative_error,
        "fit_max_relative_error": report.max_relative_error,
    }
    print(
        f"\ncalibrated: dense_mfu {eff.dense_mfu:.3f}, attention_mfu {eff.attention_mfu:.3f}, "
        f"overhead {eff.microbatch_overhead_s * 1e3:.2f} ms/micro-batch; fit RMS error "
        f"{report.rms_relative_error * 100:.1f} %, max {report.max_relative_error * 100:.1f} %"
    )
    if len(points) >= 3:
        try:
            _, held = holdout_calibration(cm_time, points)
            result["holdout_relative_errors"] = held.tolist()
            print(
                f"hold-out (every 3rd point predicted by a fit on the others): max |error| {np.max(np.abs(held)) * 100:.1f} %"
            )
        except ValueError as e:  # too few points for the unknowns: reported, not fatal
            print(f"hold-out skipped: {e}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
