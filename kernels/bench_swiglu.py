"""Benchmark of ``swiglu`` (Triton, forward + backward) vs torch eager and the bandwidth floor.

GPU (one command):  python kernels/bench_swiglu.py
CPU check that it runs (numbers meaningless):  python kernels/bench_swiglu.py --cpu-smoke

Shapes ``TOKENSxF`` (default 16384x8192, the ~1B model at 16K packs, and 8192x14336, the 8B
model), bf16. Torch eager is Megatron MLP's unfused GLU: ``F.silu(gate) * up`` on
``torch.chunk(z, 2, -1)``. Floor bytes, fwd + bwd, in passes over ``N·F`` elements: 8 (read
z = 2, write out = 1; read z = 2 and dout = 1, write dz = 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from megatron_hbp.kernels import swiglu
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff
except ImportError:  # a checkout without `pip install -e .` (a bare GPU machine)
    _root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_root))
    import megatron_hbp

    megatron_hbp.__path__.append(str(_root))  # megatron_hbp.kernels -> <repo>/kernels
    from megatron_hbp.kernels import swiglu
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff


def run_shape(N: int, F_: int, device, bw: float, dtype=torch.bfloat16) -> None:
    z = torch.randn(N, 2 * F_, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(N, F_, device=device, dtype=dtype)

    def ours():
        out = swiglu(z)
        out.backward(dout)
        return out

    def eager():
        gate, up = torch.chunk(z, 2, dim=-1)
        out = F.silu(gate) * up
        out.backward(dout)
        return out

    err = rel_diff(ours().detach(), eager().detach())
    ours_ms, eager_ms = measure_ms(ours), measure_ms(eager)
    floor_ms = 8 * N * F_ * z.element_size() / bw * 1e3
    print_row(f"{N}x{F_}", ours_ms, eager_ms, floor_ms, err)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x8192", "8192x14336"])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU: checks the script runs")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        run_shape(64, 128, torch.device("cpu"), bw=1e10, dtype=torch.float32)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_swiglu: no CUDA device; use --cpu-smoke to check the script on CPU")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for shape in args.shapes:
        N, F_ = (int(v) for v in shape.lower().split("x"))
        run_shape(N, F_, device, bw)


if __name__ == "__main__":
    main()
