"""Benchmark of ``rope_qk`` (Triton, q and k, forward + backward) vs torch eager and the floor.

GPU (one command):  python kernels/bench_rope.py
CPU check that it runs (numbers meaningless):  python kernels/bench_rope.py --cpu-smoke

Shapes ``TOKENSxHQxHKxD`` (default 16384x32x8x64, the ~1B model at 16K packs, and
16384x32x8x128, the 8B model), bf16, positions of 15 documents restarting at 0, Llama-3
scaled frequencies. Torch eager is the trainer's unfused path
(``megatron_hbp.mcore.attention.apply_rope``, the same math as the kernels' reference, run
here from ``rope_reference``) on q and k. Floor bytes, fwd + bwd: 4 passes over q and k
(read, write; read grad, write grad); the positions and cos/sin are not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    from megatron_hbp.kernels import rope_qk, rope_reference
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff
except ImportError:  # a checkout without `pip install -e .` (a bare GPU machine)
    _root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(_root))
    import megatron_hbp

    megatron_hbp.__path__.append(str(_root))  # megatron_hbp.kernels -> <repo>/kernels
    from megatron_hbp.kernels import rope_qk, rope_reference
    from megatron_hbp.kernels.bench_layers_common import copy_bandwidth, measure_ms, print_row, rel_diff


def run_shape(T: int, hq: int, hk: int, d: int, device, bw: float, dtype=torch.bfloat16) -> None:
    gen = torch.Generator().manual_seed(0)
    cuts = sorted(torch.randperm(T - 1, generator=gen)[:14].add(1).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, T])]
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    inv = torch.where(2 * torch.pi / inv > 8192, inv / 32, inv).float().to(device)  # Llama-3-like scaling
    q = torch.randn(T, hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(T, hk, d, device=device, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def ours():
        qo, ko = rope_qk(q, k, pos, inv)
        torch.autograd.backward([qo, ko], [dq, dk])
        return qo

    def eager():
        qo, ko = rope_reference(q, pos, inv), rope_reference(k, pos, inv)
        torch.autograd.backward([qo, ko], [dq, dk])
        return qo

    err = rel_diff(ours().detach(), eager().detach())
    ours_ms, eager_ms = measure_ms(ours), measure_ms(eager)
    floor_ms = 4 * T * (hq + hk) * d * q.element_size() / bw * 1e3
    print_row(f"{T}x{hq}x{hk}x{d}", ours_ms, eager_ms, floor_ms, err)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["16384x32x8x64", "16384x32x8x128"])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU: checks the script runs")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        run_shape(64, 2, 1, 16, torch.device("cpu"), bw=1e10, dtype=torch.float32)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_rope: no CUDA device; use --cpu-smoke to check the script on CPU")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    for shape in args.shapes:
        T, hq, hk, d = (int(v) for v in shape.lower().split("x"))
        run_shape(T, hq, hk, d, device, bw)


if __name__ == "__main__":
    main()
