"""Benchmark of attention_cost: time and achieved bandwidth against a device-to-device copy.

GPU (one command):  python kernels/bench_attention_cost.py
CPU check that it runs (numbers meaningless):  ... bench_attention_cost --cpu-smoke

Bandwidth counts bytes read + written: ours reads the lengths and offsets and writes the
``[num_packs, cp]`` int64 result; the copy reads and writes the lengths + offsets bytes
(``torch.Tensor.copy_`` of one flat byte buffer), measured in the same run. Times are
medians over ``--iters`` runs after ``--warmup`` runs, with CUDA events. Prints a table;
never asserts (a mismatch with the PyTorch reference is printed in the "exact" column).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

try:
    from megatron_hbp.kernels import attention_cost, attention_cost_reference
except ImportError:  # a checkout without `pip install -e .` (e.g. a bare GPU machine)
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_root))
    import megatron_hbp

    megatron_hbp.__path__.append(str(_root))  # megatron_hbp.kernels -> <repo>/kernels
    from megatron_hbp.kernels import attention_cost, attention_cost_reference


def make_packs(num_docs: int, num_packs: int, max_len: int, dtype: torch.dtype, seed: int):
    """Random documents (lengths 1..max_len, skewed short) cut into packs at random points."""
    gen = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(num_docs, generator=gen) ** 3 * (max_len - 1)).to(torch.int64) + 1
    cuts = torch.randint(0, num_docs + 1, (num_packs - 1,), generator=gen).sort().values
    offsets = torch.cat(
        [torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), num_docs, dtype=torch.int64)]
    )
    return lengths.to(dtype), offsets.to(dtype)


def time_fn(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-docs", type=int, default=10_000_000, help="documents (default 10M)")
    parser.add_argument("--num-packs", type=int, default=1_000_000, help="packs (default 1M)")
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4, 8], help="CP degrees to run")
    parser.add_argument("--max-len", type=int, default=32768, help="longest document")
    parser.add_argument("--dtype", choices=["int32", "int64"], default="int32", help="lengths/offsets dtype")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes on CPU (PyTorch path): checks the script runs",
    )
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        device = torch.device("cpu")
        args.num_docs, args.num_packs, args.warmup, args.iters = 20_000, 2_000, 1, 3
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("bench_attention_cost: no CUDA device; use --cpu-smoke to check the script on CPU")

    dtype = getattr(torch, args.dtype)
    lengths_cpu, offsets_cpu = make_packs(args.num_docs, args.num_packs, args.max_len, dtype, args.seed)
    lengths, offsets = lengths_cpu.to(device), offsets_cpu.to(device)
    in_bytes = lengths.numel() * lengths.element_size() + offsets.numel() * offsets.element_size()
    src = torch.empty(in_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_fn(lambda: dst.copy_(src), device, args.warmup, args.iters)
    copy_gbs = 2 * in_bytes / copy_ms / 1e6

    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: numbers not meaningful)"
    )
    print(f"attention_cost on {name}: {args.num_docs:,} docs in {args.num_packs:,} packs, {args.dtype}")
    print(
        f"device-to-device copy of {in_bytes / 1e6:.1f} MB: {copy_ms:.3f} ms, {copy_gbs:.1f} GB/s (read+write)"
    )
    header = f"{'cp':>3} {'ours ms':>9} {'ours GB/s':>10} {'% of copy':>10} {'torch ref ms':>13} {'exact':>6}"
    print(header)
    print("-" * len(header))
    for cp in args.cp:
        out_bytes = args.num_packs * cp * 8
        ref_ms = time_fn(lambda cp=cp: attention_cost_reference(lengths, offsets, cp), device, 1, 3)
        ours_ms = time_fn(lambda cp=cp: attention_cost(lengths, offsets, cp), device, args.warmup, args.iters)
        exact = torch.equal(
            attention_cost(lengths, offsets, cp).cpu(), attention_cost_reference(lengths_cpu, offsets_cpu, cp)
        )
        gbs = (in_bytes + out_bytes) / ours_ms / 1e6
        print(
            f"{cp:>3} {ours_ms:>9.3f} {gbs:>10.1f} {100 * gbs / copy_gbs:>9.0f}% {ref_ms:>13.2f} {'yes' if exact else 'NO':>6}"
        )


if __name__ == "__main__":
    main()
