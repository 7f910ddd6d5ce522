"""Benchmark of token_balanced_cross_entropy (forward + backward) against torch eager.

GPU (one command):  python kernels/bench_cross_entropy.py
CPU check that it runs (numbers meaningless):  ... bench_cross_entropy --cpu-smoke

For each shape (default: T=8192/H=4096/V=128256, T=32768, and V=151936 (Qwen2.5), bf16)
it measures, in the same process:
- ours: ``token_balanced_cross_entropy(hidden, weight, labels, normalizer)`` fwd+bwd, for
  both ``grad_mode="recompute"`` and ``grad_mode="in_forward"``; the row of the mode the
  default ``grad_mode="auto"`` runs (on CUDA: "in_forward") is marked ``*``. Optional extra
  "in_forward" rows with other token chunks: ``--in-forward-chunk-tokens 256 384``;
- torch eager: ``F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / N``
  fwd+bwd (bf16 logits upcast to fp32, as Megatron/HF losses do);
- the matmul floor: 3 x the time of one plain bf16 ``hidden @ weight.T`` (the forward
  logits GEMM; the backward needs two more of the same FLOPs).
Time: median of CUDA-event timings after warm-up. Extra peak memory: peak allocated during
fwd+bwd minus what was allocated before (inputs), gradients included for both. Prints a
table and the max relative difference of ours vs eager; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

try:
    from megatron_hbp.kernels import token_balanced_cross_entropy
    from megatron_hbp.kernels.cross_entropy import fused_linear as ce_module
except ImportError:  # a checkout without `pip install -e .` (e.g. a bare GPU machine)
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_root))
    import megatron_hbp

    megatron_hbp.__path__.append(str(_root))  # megatron_hbp.kernels -> <repo>/kernels
    from megatron_hbp.kernels import token_balanced_cross_entropy
    from megatron_hbp.kernels.cross_entropy import fused_linear as ce_module

DEFAULT_SHAPES = ["8192x4096x128256", "32768x4096x128256", "8192x4096x151936"]


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        T, H, V = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"shape must look like TxHxV (e.g. 8192x4096x128256), got {text!r}"
        ) from exc
    return T, H, V


def ours_step(hidden, weight, labels, normalizer, grad_mode="auto", chunk_tokens=None):
    loss = token_balanced_cross_entropy(
        hidden, weight, labels, normalizer, grad_mode=grad_mode, chunk_tokens=chunk_tokens
    )
    loss.backward()
    return loss


def eager_step(hidden, weight, labels, normalizer):
    loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / normalizer
    loss.backward()
    return loss


def measure(fn, device, warmup: int, iters: int, reset=None) -> tuple[float, float]:
    """(median ms, extra peak GB) of fn(); ``reset`` clears gradients before every call."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    times = []
    peak_gb = float("nan")
    for i in range(iters):
        if reset:
            reset()
        if cuda:
            torch.cuda.synchronize(device)
            if i == 0:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if i == 0:
                peak_gb = (torch.cuda.max_memory_allocated(device) - base) / 1e9
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak_gb


def gb(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_shape(
    T: int, H: int, V: int, dtype, device, warmup: int, iters: int, skip_eager: bool, extra_chunks=()
) -> list[str]:
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(T, H, generator=gen, device=device) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    labels[::7] = -100
    normalizer = (labels != -100).sum().float()

    def reset():
        hidden.grad = None
        weight.grad = None

    rows = []
    ours = {}
    default = ce_module._resolve_grad_mode("auto", device, True)
    runs = [("recompute", None), ("in_forward", None)] + [("in_forward", c) for c in extra_chunks]
    for mode, chunk in runs:
        ms, peak = measure(
            lambda mode=mode, chunk=chunk: ours_step(hidden, weight, labels, normalizer, mode, chunk),
            device,
            warmup,
            iters,
            reset,
        )
        reset()
        loss = ours_step(hidden, weight, labels, normalizer, mode, chunk).detach()
        name = f"{mode}{'*' if mode == default and chunk is None else ''}"
        if chunk is not None:
            name = f"{mode} Tc={chunk}"
        ours[name] = (ms, peak, loss, hidden.grad.clone(), weight.grad.clone())
        del loss
        reset()
    reset()
    with torch.no_grad():
        mm_ms, _ = measure(lambda: hidden @ weight.T, device, warmup, iters)
    floor_ms = 3 * mm_ms
    eager = "n/a"
    if not skip_eager:
        try:
            eager_ms, eager_gb = measure(
                lambda: eager_step(hidden, weight, labels, normalizer), device, warmup, iters, reset
            )
            reset()
            loss_eager = eager_step(hidden, weight, labels, normalizer).detach()
            eager = (eager_ms, eager_gb, loss_eager, hidden.grad.clone(), weight.grad.clone())
            reset()
        except torch.OutOfMemoryError:
            reset()
            eager = "OOM"
    shape = f"{T}x{H}x{V}"
    for mode, (ms, peak, loss, dh, dw) in ours.items():
        label = f"ours {mode}" if len(mode) < 12 else mode
        line = f"{shape:>20} {label:>16} {ms:>9.2f} {gb(peak):>10} {ms / floor_ms:>9.2f}x"
        if isinstance(eager, tuple):
            ratio_mem = "n/a" if eager[1] != eager[1] else f"{peak / eager[1]:.1%}"
            line += (
                f" {ms / eager[0]:>9.2f}x {ratio_mem:>10}   (rel diff vs eager: loss {rel_diff(loss, eager[2]):.1e},"
                f" dhidden {rel_diff(dh, eager[3]):.1e}, dweight {rel_diff(dw, eager[4]):.1e})"
            )
        rows.append(line)
        shape = ""
    if isinstance(eager, tuple):
        rows.append(
            f"{'':>20} {'torch eager':>16} {eager[0]:>9.2f} {gb(eager[1]):>10} {eager[0] / floor_ms:>9.2f}x"
        )
    else:
        rows.append(f"{'':>20} {'torch eager':>16} {eager:>9}")
    rows.append(
        f"{'':>20} {'matmul floor':>16} {floor_ms:>9.2f} {'':>10} {1.0:>9.2f}x   (3 x {mm_ms:.2f} ms bf16 GEMM)"
    )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=None, help="TxHxV shapes (default: the three)"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip-eager", action="store_true", help="do not run the torch eager baseline")
    parser.add_argument(
        "--in-forward-chunk-tokens",
        type=int,
        nargs="*",
        default=[],
        metavar="TC",
        help="extra grad_mode='in_forward' rows with these chunk_tokens (default chunk on CUDA: 512)",
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shape on CPU (PyTorch path): checks the script runs"
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
        shapes = args.shapes or [(256, 64, 1000)]
        args.warmup, args.iters = 1, 2
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    else:
        raise SystemExit("bench_cross_entropy: no CUDA device; use --cpu-smoke to check the script on CPU")
    dtype = getattr(torch, args.dtype)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: numbers not meaningful)"
    )
    print(f"token_balanced_cross_entropy fwd+bwd on {name}, {args.dtype}, torch {torch.__version__}")
    header = (
        f"{'T x H x V':>20} {'method':>16} {'ms':>9} {'+peak GB':>10} {'vs floor':>10} {'vs eager':>10} "
        f"{'mem/eager':>10}"
    )
    print(header)
    print("-" * len(header))
    for T, H, V in shapes:
        rows = run_shape(
            T, H, V, dtype, device, args.warmup, args.iters, args.skip_eager, args.in_forward_chunk_tokens
        )
        for row in rows:
            print(row, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    default = ce_module._resolve_grad_mode("auto", device, True)
    print(
        f"* the default: grad_mode='auto' runs '{default}' on {device.type} tensors when a gradient is needed"
    )


if __name__ == "__main__":
    main()
