"""Shared timing helpers of ``bench_rmsnorm.py``, ``bench_swiglu.py`` and ``bench_rope.py``.

Each benchmark times forward + backward of the Triton kernel and of the trainer's torch
eager path on the same inputs, and a bandwidth floor: the bytes the fused op must read and
write (fwd + bwd) divided by the device-to-device copy bandwidth measured in the same run
(``copy_bandwidth``: read + write of a 1 GiB buffer). Median of CUDA-event timings after
warm-up. Prints a table; never asserts.
"""

from __future__ import annotations

import statistics

import torch


def measure_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on CUDA, wall clock elsewhere)."""
    import time

    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of ``dst.copy_(src)`` counting read + write (the achievable HBM bandwidth)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = measure_ms(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * nbytes / (ms * 1e-3)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def print_row(name: str, ours_ms: float, eager_ms: float, floor_ms: float, err: float) -> None:
    print(
        f"{name:>34}  ours {ours_ms:8.3f} ms  eager {eager_ms:8.3f} ms  floor {floor_ms:8.3f} ms  "
        f"ours/eager {ours_ms / eager_ms:5.2f}  ours/floor {ours_ms / floor_ms:5.2f}  max rel diff {err:.2e}",
        flush=True,
    )
