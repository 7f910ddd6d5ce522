#!/usr/bin/env python
"""The trainer's memory pre-flight for a GPU launch, without launching anything (no GPU needed).

Per plan group: the modelled peak memory of one GPU and its parts, the CP backend the trainer
would run, and the verdict of the trainer's own rule (``megatron_hbp.mcore.memory.memory_verdicts``):
ok; warning (only the estimated reserve for CUDA context / NCCL / fragmentation tips it over —
the trainer launches and prints it); refused (the modelled tensors alone do not fit — the trainer
stops before building the model; the line says the smallest recompute that fits).

  python tools/preflight.py --config configs/llama3_1_8b_128k_hbp.yaml --gpu h100_sxm --num-gpus 32
  python tools/preflight.py --config configs/llama3_1_8b_128k_hbp.yaml --gpu h100_sxm --num-gpus 32 \\
      --set cp_backend=allgather
  python tools/preflight.py --config RUN.yaml --gpu h200 --num-gpus 64 --sample-info data/info.npz

The plan: ``plan.path`` when that file exists, else built from ``plan.config`` for
``num_gpus / (tp * pp)`` data x context ranks over ``--lengths`` / ``--sample-info`` /
the sample info of the config when it exists, else the paper's synthetic mix
(``tools/synth_lengths.py tulu3_longcite``). The run is modelled as on a GPU: dtype ``auto`` =
bf16, ``loss_impl: auto`` = the fused loss, attention ``auto`` = varlen (TE when installed).

Exit codes: 0 every group would launch (warnings allowed), 3 a group would be refused,
2 a configuration error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

GIB = 2**30
PARTS = ("weights", "gradients", "optimizer", "activations", "loss", "cp_buffers", "reserve")


def _lengths(a, cfg):
    from megatron_hbp.data import load_sample_info

    if a.lengths:
        lengths = np.load(a.lengths).astype(np.int64)
        return lengths, lengths, f"{a.lengths} ({lengths.size} samples)"
    path = a.sample_info or (cfg.data.sample_info if Path(cfg.data.sample_info).is_file() else None)
    if path:
        info = load_sample_info(path)
        return info.lengths, info.loss_tokens, f"sample info {path} ({info.lengths.size} samples)"
    from megatron_hbp.planner.synth import synth_lengths

    lengths = synth_lengths("tulu3_longcite", 0, 1.0).astype(np.int64)
    return lengths, lengths, f"synthetic tulu3_longcite mix ({lengths.size} samples)"


def _plan(a, cfg, dp_size: int):
    import yaml

    from megatron_hbp import load_plan
    from megatron_hbp.configio import from_dict
    from megatron_hbp.planner import PlanConfig, build_plan

    p = Path(cfg.plan.path)
    if p.is_file() or (p / "plan.npz").is_file():
        plan = load_plan(p if p.is_file() else p / "plan.npz")
        return plan, f"plan file {p}"
    if not cfg.plan.config or not Path(cfg.plan.config).is_file():
        raise SystemExit(
            f"error: plan {cfg.plan.path} does not exist and plan.config is not set (or missing)"
        )
    data = yaml.safe_load(Path(cfg.plan.config).read_text()) or {}
    data.update(cfg.plan.overrides)
    data["world_size"] = dp_size
    pcfg = from_dict(PlanConfig, data, where=str(cfg.plan.config))
    lengths, loss_tokens, src = _lengths(a, cfg)
    plan = build_plan(lengths, loss_tokens, pcfg)
    return plan, f"{cfg.plan.config} over {src}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    p.add_argument(
        "--gpu", default="h100_sxm", help="hardware profile (megatron_hbp/costmodel/hardware/*.yaml)"
    )
    p.add_argument("--num-gpus", type=int, required=True, help="processes of the launch (tp x pp x DP x CP)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--lengths", help="per-sample lengths (.npy) to build the plan from")
    src.add_argument("--sample-info", help="sample info (.npz) to build the plan from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-YAML key")
    a = p.parse_args(argv)
    # Megatron's import-time notes about missing TE/Apex say nothing about this check
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

    from megatron_hbp.configio import ConfigError
    from megatron_hbp.costmodel.hardware import load_hardware
    from megatron_hbp.mcore.attention import _te_available, resolve_backend
    from megatron_hbp.mcore.config import load_train_config
    from megatron_hbp.mcore.cp_seam import resolve_cp_impl
    from megatron_hbp.mcore.memory import _rmsnorm_fused, memory_verdicts, trainer_cost_model
    from megatron_hbp.model_config import load_model_config

    try:
        cfg = load_train_config(a.config, a.set)
        model = load_model_config(cfg.model_source)
        hw = load_hardware(a.gpu)
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        if a.num_gpus < 1 or a.num_gpus % (tp * pp):
            raise ConfigError(f"--num-gpus {a.num_gpus} is not a multiple of tp*pp = {tp * pp}")
        plan, plan_src = _plan(a, cfg, a.num_gpus // (tp * pp))
        degrees = sorted({int(g.cp) for g in plan.groups})
        te = _te_available()
        backend = resolve_backend(
            cfg.attention_backend, on_cuda=True, dtype=None, te_available=te, varlen_available=True
        )
        cp_impl, why = resolve_cp_impl(
            cfg.cp_backend,
            num_heads=model.num_attention_heads,
            num_kv_heads=model.num_query_groups,
            tp=tp,
            degrees=degrees,
            te_available=te,
        )
        bf16 = cfg.dtype != "fp32"
        fused = cfg.loss_impl != "megatron" and cfg.loss_normalization == "step_token_mean"
        cm = trainer_cost_model(
            model,
            world=a.num_gpus,
            tp=tp,
            pp=pp,
            bf16=bf16,
            attention_backend=backend,
            fused_loss=fused,
            distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
            rmsnorm_fused=_rmsnorm_fused(),
            hardware=hw,
            cp_impl=cp_impl,
        )
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    limit = hw.memory_bytes
    print(
        f"{a.config}: model {model.name}, {a.num_gpus} x {hw.name} ({limit / GIB:.1f} GiB), tp={tp} pp={pp}, "
        f"{'bf16' if bf16 else 'fp32'}, attention {backend}, loss {'fused' if fused else 'megatron'}, "
        f"CP attention {cp_impl} (cp_backend {cfg.cp_backend}: {why})"
    )
    print(f"plan: {plan_src}: {plan.num_steps} steps, groups {[(g.pack_length, g.cp) for g in plan.groups]}")
    header = [
        "group",
        "pack",
        "cp",
        "recompute",
        "tokens/rank",
        *PARTS,
        "total GiB",
        "tensors GiB",
        "verdict",
    ]
    rows = []
    verdicts = memory_verdicts(cm, plan, limit, pp=pp)
    for v in verdicts:
        m = v.memory
        rows.append(
            [
                str(v.group),
                str(v.pack_length),
                str(v.cp),
                str(v.recompute_layers),
                str(v.pack_length // v.cp),
                *(f"{getattr(m, n) / GIB:.2f}" for n in PARTS),
                f"{m.total / GIB:.2f}",
                f"{(m.total - m.reserve) / GIB:.2f}",
                v.verdict + (f" (recompute >= {v.min_recompute_fit} fits)" if v.verdict != "ok" else ""),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    for v in verdicts:
        if v.verdict != "ok":
            print(f"{v.verdict.upper()}: {v.message}")
    refused = [v for v in verdicts if v.verdict == "refused"]
    print(
        f"verdict: {'REFUSED' if refused else 'ok'} "
        f"({len(refused)} refused, {sum(v.verdict == 'warning' for v in verdicts)} reserve-only warnings)"
    )
    return 3 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
