"""Benchmark of ``rms_norm`` (Triton, forward + backward) vs torch eager and the bandwidth floor.

GPU (one command):  python kernels/bench_rmsnorm.py
CPU check that it runs (numbers meaningless):  python kernels/bench_rmsnorm.py --cpu-smoke

Shapes ``TOKENSxHIDDEN`` (default 16384x2048, the ~1B model at 16K packs, and 16384x4096,
8192x8192), bf16, plain and fused with the residual add. Torch eager is the trainer's torch
path: ``F.rms_norm`` (``torch.nn.RMSNorm``), with the residual add done before it. Floor
bytes, fwd + bwd, in passes over ``N·H`` elements: plain 5 (read x, write y; read dy and x,
write dx), residual 8 (also read r, write h, read dh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from megatron_hbp.kernels import rms_norm
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff
except ImportError:  # a checkout without `pip install -e .` (a bare GPU machine)
    _root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_root))
    import megatron_hbp

    megatron_hbp.__path__.append(str(_root))  # megatron_hbp.kernels -> <repo>/kernels
    from megatron_hbp.kernels import rms_norm
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff


def run_shape(N: int, H: int, residual: bool, device, bw: float, dtype=torch.bfloat16) -> None:
    x = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True) if residual else None
    w = (1 + 0.1 * torch.randn(H, device=device)).to(dtype).requires_grad_()
    dy = torch.randn(N, H, device=device, dtype=dtype)

    def ours():
        out = rms_norm(x, w, 1e-5, residual=r)
        y, h = out if residual else (out, None)
        torch.autograd.backward([y, h] if residual else [y], [dy, dy] if residual else [dy])
        return y

    def eager():
        h = x + r if residual else x
        y = F.rms_norm(h, (H,), w, 1e-5)
        torch.autograd.backward([y, h] if residual else [y], [dy, dy] if residual else [dy])
        return y

    err = rel_diff(ours().detach(), eager().detach())
    ours_ms, eager_ms = measure_ms(ours), measure_ms(eager)
    nbytes = (8 if residual else 5) * N * H * x.element_size()
    floor_ms = nbytes / bw * 1e3
    print_row(f"{N}x{H} {'residual' if residual else 'plain'}", ours_ms, eager_ms, floor_ms, err)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x2048", "16384x4096", "8192x8192"])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU: checks the script runs")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        run_shape(64, 128, False, torch.device("cpu"), bw=1e10, dtype=torch.float32)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_rmsnorm: no CUDA device; use --cpu-smoke to check the script on CPU")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for shape in args.shapes:
        N, H = (int(v) for v in shape.lower().split("x"))
        for residual in (False, True):
            run_shape(N, H, residual, device, bw)


if __name__ == "__main__":
    main()
