"""Plan report (report.json / report.md), side-by-side comparison table, and plots.

matplotlib is imported lazily (Agg backend) only by the plot functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_hbp.configio import to_dict
from megatron_hbp.planner.metrics import compute_metrics, step_metrics
from megatron_hbp.planner.plan import Plan


def balance_summary(plan: Plan) -> dict:
    """Mean over steps of max/mean replica cost for none / sort / lpt on the same packs, per group.

    Two costs: ``cost`` = the balancer's cost model (cost_linear_coef * tokens + sum l^2) and
    ``attn`` = sum l^2 only. Only plans built in this process carry it (not saved in plan files).
    """
    out = {}
    for g, d in sorted(plan.stats.get("balance", {}).items()):
        out[str(g)] = {
            method: {kind: float(np.concatenate(v[kind]).mean()) for kind in ("cost", "attn")}
            for method, v in d.items()
        }
    return out


def build_report(plan: Plan, *, cp_balance: bool = True) -> dict:
    """Metrics + timings + balance comparison, JSON-ready."""
    rep = compute_metrics(plan, cp_balance=cp_balance)
    rep["plan_seconds"] = plan.stats.get("plan_seconds")
    rep["plan_cpu_seconds"] = plan.stats.get("plan_cpu_seconds")
    rep["stage_seconds"] = plan.stats.get("stage_seconds")
    rep["metrics_seconds"] = None
    rep["balance_method"] = plan.config.balance
    rep["cost_linear_coef"] = plan.config.cost_linear_coef
    rep["balance"] = balance_summary(plan)
    gf = plan.stats.get("greedy_fill_samples")
    rep["greedy_fill_samples"] = gf
    rep["drops"] = plan.stats.get("drops")
    rep["fingerprint"] = plan.fingerprint
    rep["config"] = to_dict(plan.config)
    return rep


def _f(x, nd=4):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def report_markdown(rep: dict, title: str = "Plan report") -> str:
    """Human-readable report.md text."""
    lines = [f"# {title}", ""]
    lines.append(
        f"{rep['num_samples']} samples, {rep['num_steps']} steps, {rep['num_packs']} packs, "
        f"{rep['total_tokens']} tokens, world size {rep['world_size']}, epochs {rep['epochs']}; "
        f"dropped {rep['num_dropped']} ({', '.join(f'{k}: {v}' for k, v in rep['dropped_by_reason'].items())}); "
        f"planned in {_f(rep.get('plan_seconds'), 2)} s."
    )
    drops = rep.get("drops")
    if drops and rep["num_dropped"]:
        lines += [
            "",
            "Dropped samples by length (tokens: dropped / planned sample-epochs): "
            + ", ".join(f"{k}: {v[0]}/{v[1]}" for k, v in drops["by_length"].items() if v[0])
            + ".",
        ]
    if drops and drops.get("warning"):
        lines += ["", f"**{drops['warning']}**"]
    lines += [
        "",
        "| group | pack_length | cp | recompute | steps | packs | samples | token share | PR | DBR | ABR | CR | ave_tokens | slot ABR |",
    ]
    lines.append("|---" * 14 + "|")
    for g in rep["per_group"]:
        lines.append(
            f"| {g['group']} | {g['pack_length']} | {g['cp']} | {g['recompute_layers']} | {g['num_steps']} | "
            f"{g['num_packs']} | {g['num_samples']} | {_f(g['token_share'], 3)} | {_f(g['PR'], 6)} | {_f(g['DBR'], 6)} | "
            f"{_f(g['ABR'], 6)} | {_f(g['CR'], 3)} | {g['ave_tokens']:.0f} | {_f(g['slot_ABR'], 6)} |"
        )
    lines.append(
        f"| all | | | | {rep['num_steps']} | {rep['num_packs']} | {rep['num_placed']} | 1.000 | {_f(rep['PR'], 6)} | "
        f"{_f(rep['DBR'], 6)} | {_f(rep['ABR'], 6)} | {_f(rep['CR'], 3)} | {rep['ave_tokens']:.0f} | "
        f"{_f(rep['slot_ABR'], 6)} |"
    )
    if rep.get("balance"):
        lines += [
            "",
            f"Balancing ({rep['balance_method']}, cost = {rep['cost_linear_coef']:g} * tokens + sum l^2): "
            "mean over steps of max replica cost / mean replica cost, same packs:",
            "",
            "| group | none (cost) | sort (cost) | lpt (cost) | none (l^2) | sort (l^2) | lpt (l^2) |",
            "|---|---|---|---|---|---|---|",
        ]
        for g, d in rep["balance"].items():
            lines.append(
                f"| {g} | "
                + " | ".join(_f(d[m]["cost"], 6) for m in ("none", "sort", "lpt"))
                + " | "
                + " | ".join(_f(d[m]["attn"], 6) for m in ("none", "sort", "lpt"))
                + " |"
            )
    cpb = [g for g in rep["per_group"] if g.get("cp_rank_max_over_mean") is not None]
    if cpb:
        lines += [
            "",
            "Zigzag CP split, causal pairs per rank inside each replica (max/mean, mean over replicas):",
        ]
        lines += [f"- group {g['group']} (cp {g['cp']}): {g['cp_rank_max_over_mean']:.6f}" for g in cpb]
    if rep.get("stage_seconds"):
        lines += [
            "",
            "Stage times (s): " + ", ".join(f"{k} {v:.3f}" for k, v in rep["stage_seconds"].items()),
        ]
    return "\n".join(lines) + "\n"


def write_report(plan: Plan, out_dir: str | Path, *, title: str = "Plan report") -> dict:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns the report dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = build_report(plan)
    (out_dir / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=False) + "\n")
    (out_dir / "report.md").write_text(report_markdown(rep, title))
    return rep


COMPARE_ROWS = (
    ("groups", None),
    ("PR", 6),
    ("DBR", 6),
    ("ABR", 6),
    ("CR", 4),
    ("ave_tokens", 0),
    ("slot_ABR", 6),
    ("attn_max_over_mean", 6),
    ("num_steps", None),
    ("num_dropped", None),
    ("plan_seconds", 2),
    ("plan_cpu_seconds", 2),
)


def compare_table(named_reports: list[tuple[str, dict]]) -> str:
    """Markdown table with one column per config (like the paper's Table 6)."""
    names = [n for n, _ in named_reports]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, nd in COMPARE_ROWS:
        cells = []
        for _, r in named_reports:
            if key == "groups":
                cells.append(" + ".join(f"{g['pack_length'] // 1024}K/cp{g['cp']}" for g in r["per_group"]))
            else:
                v = r.get(key)
                cells.append(_f(float(v), nd) if isinstance(v, (int, float)) and nd is not None else _f(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_histogram(lengths: np.ndarray, pack_lengths: list[int], path: str | Path) -> Path:
    """Log-log histogram of sample lengths with the group boundaries as vertical lines."""
    plt = _plt()
    lengths = np.asarray(lengths)
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=90)
    lo, hi = max(1, int(lengths.min())), int(lengths.max())
    bins = np.geomspace(lo, max(hi, lo + 1), 80)
    ax.hist(lengths, bins=bins, color="#4477aa")
    for pl in pack_lengths:
        ax.axvline(pl, color="#cc3311", ls="--", lw=1)
        ax.text(pl, ax.get_ylim()[1] * 0.5, f" {pl // 1024}K", color="#cc3311", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sample length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title(f"{len(lengths)} samples; dashed: group pack lengths", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_balance(plan: Plan, path: str | Path) -> Path:
    """Per-step max/mean replica attention cost (sum l^2) before balancing (random order) and
    after (sort, and lpt), one panel per group; y = max/mean - 1 on a log axis (floor 1e-7)."""
    plt = _plt()
    bal = plan.stats.get("balance", {})
    groups = sorted(bal)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(6.4 * max(1, len(groups)) / 1.4, 3.2), dpi=90)
    axes = np.atleast_1d(axes)
    colors = {"none": "#bbbbbb", "sort": "#ee7733", "lpt": "#0077bb"}
    for ax, g in zip(axes, groups):
        for method in ("none", "sort", "lpt"):
            if method not in bal[g]:
                continue
            v = np.concatenate(bal[g][method]["attn"])
            label = {"none": "no balancing", "sort": "sort (paper)", "lpt": "lpt (ours)"}[method]
            y = np.maximum(v - 1.0, 1e-7)
            ax.plot(
                np.arange(len(v)), y, ".", ms=2.5, color=colors[method], label=f"{label}: mean {v.mean():.5f}"
            )
        grp = plan.groups[g]
        ax.set_yscale("log")
        ax.set_xlabel("step (heaviest first for sort/lpt)")
        ax.set_ylabel("max/mean replica sum l^2  - 1")
        ax.set_title(f"group {g}: {grp.pack_length // 1024}K, cp {grp.cp}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_steps(plan: Plan, path: str | Path) -> Path:
    """Per step in training order: ABR and tokens per device, coloured by group."""
    plt = _plt()
    sm = step_metrics(plan)
    sg = plan.arrays["step_group"]
    fig, ax = plt.subplots(figsize=(6.4, 3.0), dpi=90)
    for gi, g in enumerate(plan.groups):
        idx = np.nonzero(sg == gi)[0]
        ax.plot(idx, sm["ABR"][idx] + 1e-7, ".", ms=3, label=f"{g.pack_length // 1024}K cp{g.cp}")
    ax.set_yscale("log")
    ax.set_xlabel("step (training order)")
    ax.set_ylabel("ABR (+1e-7)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
