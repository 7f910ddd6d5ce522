"""Human-readable summary of sample info: counts, length percentiles, a log-binned histogram."""

from __future__ import annotations

import os

import numpy as np

from megatron_hbp.data.sample_info import SampleInfo

__all__ = ["log2_histogram", "format_summary", "plot_histogram"]


def log2_histogram(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``lengths`` in power-of-two bins ``[2^k, 2^(k+1))``.

    Returns ``(edges int64 [B+1], counts int64 [B])`` covering min..max; empty input gives
    ``([1], [])``. Lengths < 1 fall into the first bin ``[1, 2)`` — they do not occur in
    sample info (every sample has at least one token).
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0:
        return np.array([1], np.int64), np.zeros(0, np.int64)
    exps = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    lo, hi = int(exps.min()), int(exps.max())
    counts = np.bincount(exps - lo, minlength=hi - lo + 1).astype(np.int64)
    edges = 2 ** np.arange(lo, hi + 2, dtype=np.int64)
    return edges, counts


def _fmt_tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def format_summary(info: SampleInfo, *, width: int = 40) -> str:
    """Multi-line text: samples, tokens, loss tokens, length percentiles, a text histogram with
    log2 bins, and the counts of skipped / truncated / dropped samples."""
    s = info.stats
    L = np.asarray(info.lengths, np.int64)
    out = []
    out.append(f"sample info: {info.path}   fingerprint {info.fingerprint}")
    out.append(
        f"  files {len(info.files)}, template {info.template!r}, tokenizer {os.path.basename(info.tokenizer)}, "
        f"max_length {info.max_length if info.max_length is not None else 'none'}"
        + (f" ({'truncate' if info.truncate else 'drop'})" if info.max_length is not None else "")
    )
    loss = int(np.asarray(info.loss_tokens, np.int64).sum())
    out.append(
        f"  samples {L.size:,}   tokens {int(L.sum()):,}   loss tokens {loss:,}"
        + (f" ({100.0 * loss / max(int(L.sum()), 1):.1f}%)" if L.size else "")
    )
    if L.size:
        pct = np.percentile(L, [50, 90, 99])
        out.append(
            f"  length: min {L.min():,}  p50 {pct[0]:,.0f}  p90 {pct[1]:,.0f}  p99 {pct[2]:,.0f}  "
            f"max {L.max():,}  mean {L.mean():,.1f}"
        )
        edges, counts = log2_histogram(L)
        top = max(int(counts.max()), 1)
        out.append("  length histogram (log2 bins, tokens):")
        for lo, hi, c in zip(edges[:-1], edges[1:], counts):
            bar = "#" * int(round(width * c / top)) if c else ""
            out.append(
                f"    [{_fmt_tokens(int(lo)):>5}, {_fmt_tokens(int(hi)):>5})  {c:>9,}  {100.0 * c / L.size:5.1f}%  {bar}"
            )
    bad = s.get("skipped_bad_input", {})
    n_bad = sum(bad.values())
    out.append(
        f"  skipped (bad input) {n_bad}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in bad.items()) + ")" if bad else "")
        + f"; truncated {s.get('truncated', 0)}; dropped: too long {s.get('dropped_too_long', 0)}, "
        + f"no loss tokens left after truncation {s.get('dropped_no_loss_after_truncation', 0)}; "
        + f"blank lines {s.get('blank_lines', 0)}"
    )
    if info.skipped_array.size:
        out.append(f"  first skipped lines (all {info.skipped_array.size} are in the .npz 'skipped' array):")
        out += [f"    {os.path.basename(r.file)}:{r.line}: {r.reason}"[:110] for r in info.skipped[:5]]
    if s.get("seconds"):
        secs = s["seconds"]
        out.append(
            f"  computed in {secs:.2f}s with {s.get('workers', 1)} worker(s): "
            f"{L.size / secs:,.0f} samples/s, {int(L.sum()) / secs:,.0f} tokens/s"
        )
    out += _disk_lines(info)
    return "\n".join(out)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _disk_lines(info: SampleInfo) -> list[str]:
    """Bytes on disk: the sample info and, when written, the token files (``stats['disk_bytes']``)."""
    disk = info.stats.get("disk_bytes") or {}
    own = os.path.getsize(info.path) if info.path and os.path.isfile(info.path) else None
    if not disk and own is None:
        return []
    parts = [f"sample info {_mb(own)}"] if own is not None else []
    if disk:
        n = max(int(info.stats.get("tokens", 0)), 1)
        tok = disk.get("token_bin", 0) + disk.get("token_idx", 0)
        mask = disk.get("loss_mask_bin", 0) + disk.get("loss_mask_idx", 0)
        parts.append(f"token ids {_mb(tok)} ({disk.get('token_bin', 0) / n:.0f} B/token)")
        parts.append(f"loss mask {_mb(mask)}")
        total = tok + mask + (own or 0)
        parts.append(f"total {_mb(total)}")
    else:
        parts.append("no token files (--no-tokens)")
    return ["  disk: " + ", ".join(parts)]


def plot_histogram(info: SampleInfo, path: str | os.PathLike) -> None:
    """Save a PNG of the length histogram (log2 bins, log-scaled x axis) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = np.asarray(info.lengths, np.int64)
    edges, counts = log2_histogram(L)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if counts.size:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sample length (tokens, after templating)")
    ax.set_yscale("log")  # the long documents are a thin tail next to thousands of short chats
    ax.set_ylabel("samples (log scale)")
    ax.set_title(f"{L.size:,} samples, {int(L.sum()):,} tokens ({info.template} template)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
