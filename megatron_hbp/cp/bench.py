"""Benchmark of the CP attention on one device (no communication): ``python -m megatron_hbp.cp.bench``.

Rows (forward + backward, median over ``--iters`` after warm-up, CUDA events on GPU):

* ``varlen (baseline)``: ``torch.nn.attention.varlen.varlen_attn`` called directly on the packed
  stream — the plain packed attention a CP-free run uses;
* ``cp_attention c=1``: our entry point with ``cp_size == 1`` on the same unpadded stream (the
  overhead of our wrapper: validation, cached index plan);
* ``cp_attention c=1 padded``: documents padded to a multiple of 16 (the index path);
* ``allgather rank c=N``: the attention math of ONE CP rank of degree N on the all-gather path
  (``cp_attention_local`` on the gathered K/V) — per-rank compute next to the CP-1 row;
* ``ulysses rank c=N``: ONE rank of the Ulysses path (``megatron_hbp.cp.ulysses``): the fused
  q|k|v send buffer, the zigzag -> document permutation, whole-document attention on H/c heads,
  the inverse permutation; the all-to-all is replaced by a same-size local copy (it needs
  several GPUs): its bytes per rank are printed instead.

The ``vs first`` column divides by the first row (the whole c = 1 attention); CUDA rows also
print ``max_memory_allocated`` above the inputs (MiB).

On CPU (``--cpu-smoke``) tiny shapes and the SDPA backend check that the script runs. It
prints a table and never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _doc_lengths(total: int, docs: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(docs, generator=g) + 0.05
    lens = (w / w.sum() * total).floor().long().clamp_min(1)
    lens[-1] += total - int(lens.sum())
    return [int(x) for x in lens]


def _cu(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _time(fn, iters: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _measure(fn, iters: int, device: torch.device) -> tuple[float, float]:
    """(median ms, peak MiB allocated above what was allocated before; 0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ms = _time(fn, iters, device)
    mib = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else 0.0
    return ms, mib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m megatron_hbp.cp.bench",
        description="Time megatron_hbp.cp attention (fwd+bwd) against plain varlen flash attention on one device.",
    )
    ap.add_argument("--tokens", type=int, default=32768, help="packed tokens T (default 32768)")
    ap.add_argument("--docs", type=int, default=31, help="documents in the pack (default 31)")
    ap.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    ap.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--cp", type=int, nargs="*", default=[2, 4, 8], help="CP degrees for per-rank rows")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU with SDPA (checks the script)"
    )
    args = ap.parse_args(argv)

    from megatron_hbp.cp import cp_attention, cp_attention_local, shard_for_cp
    from megatron_hbp.cp import ulysses as uly
    from megatron_hbp.cp.attention import _varlen_fn

    if args.cpu_smoke:
        args.tokens, args.docs, args.heads, args.kv_heads, args.head_dim = 512, 5, 4, 2, 16
        args.dtype, args.iters = "fp32", 3
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --cpu-smoke to check the script on CPU")
        device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    backend = "varlen" if device.type == "cuda" and dtype != torch.float32 else "sdpa"
    lens = _doc_lengths(args.tokens, args.docs, 0)
    cu = _cu(lens)
    t = cu[-1]
    g = torch.Generator(device="cpu").manual_seed(0)

    def make(n: int, h: int) -> torch.Tensor:
        return torch.randn(n, h, args.head_dim, generator=g).to(device, dtype).requires_grad_()

    q, k, v = make(t, args.heads), make(t, args.kv_heads), make(t, args.kv_heads)
    dout = torch.randn(t, args.heads, args.head_dim, generator=g).to(device, dtype)
    rows = []

    def fwd_bwd(f):
        def run():
            out = f()
            out.backward(dout)
            q.grad = k.grad = v.grad = None

        return run

    if backend == "varlen":
        fn = _varlen_fn()
        cu_dev = torch.tensor(cu, dtype=torch.int32, device=device)
        rep = args.heads // args.kv_heads
        mx = max(lens)

        def base():
            kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return fn(q, kk, vv, cu_dev, cu_dev, mx, mx, window_size=(-1, 0))

        rows.append(("varlen (baseline)", *_measure(fwd_bwd(base), args.iters, device)))
    rows.append(
        (
            "cp_attention c=1",
            *_measure(
                fwd_bwd(lambda: cp_attention(q, k, v, cu, cu, None, backend=backend)), args.iters, device
            ),
        )
    )
    if backend == "varlen":
        # the baseline once more: the spread of the two baseline rows is the timing noise
        rows.append(("varlen (baseline, again)", *_measure(fwd_bwd(base), args.iters, device)))
        with torch.no_grad():
            diff = (base() - cp_attention(q, k, v, cu, cu, None, backend=backend)).abs().max().item()
        print(f"max |cp_attention c=1 - varlen| = {diff:.3e}")

    pad16 = [-(-n // 16) * 16 for n in lens]
    cu_pad = _cu(pad16)
    qp, kp, vp = (
        make(cu_pad[-1], args.heads),
        make(cu_pad[-1], args.kv_heads),
        make(cu_pad[-1], args.kv_heads),
    )
    dpad = torch.randn(cu_pad[-1], args.heads, args.head_dim, generator=g).to(device, dtype)

    def padded():
        out = cp_attention(qp, kp, vp, cu_pad, cu, None, backend=backend)
        out.backward(dpad)
        qp.grad = kp.grad = vp.grad = None

    rows.append(("cp_attention c=1 padded", *_measure(padded, args.iters, device)))

    for c in args.cp:
        step = 2 * c
        padded_c = [-(-n // step) * step for n in lens]
        cu_c = _cu(padded_c)
        qc = make(cu_c[-1], args.heads)
        kc, vc = make(cu_c[-1], args.kv_heads), make(cu_c[-1], args.kv_heads)
        q_local = shard_for_cp(qc.detach(), cu_c, c, 0).requires_grad_()
        d_local = torch.randn(q_local.shape, generator=g).to(device, dtype)

        def rank_work(c=c, cu_c=cu_c, q_local=q_local, kc=kc, vc=vc, d_local=d_local):
            out = cp_attention_local(q_local, kc, vc, cu_c, cu, c, 0, backend=backend)
            out.backward(d_local)
            q_local.grad = kc.grad = vc.grad = None

        rows.append((f"allgather rank c={c}", *_measure(rank_work, args.iters, device)))

        if args.heads % c:
            print(f"ulysses c={c}: {args.heads} heads not divisible by {c}: skipped")
            continue
        k_local = shard_for_cp(kc.detach(), cu_c, c, 0).requires_grad_()
        v_local = shard_for_cp(vc.detach(), cu_c, c, 0).requires_grad_()
        lay = uly._layout_on(tuple(cu_c), tuple(cu), c, device)
        kv_idx = torch.tensor(uly.kv_heads_per_rank(args.heads, args.kv_heads, c), device=device)
        scale = args.head_dim**-0.5

        def ulysses_rank(
            c=c,
            q_local=q_local,
            k_local=k_local,
            v_local=v_local,
            lay=lay,
            kv_idx=kv_idx,
            d_local=d_local,
            scale=scale,
        ):
            qg, kg, vg = uly._SeqToHead.apply(q_local, k_local, v_local, None, c, kv_idx, lay)
            out = uly._HeadToSeq.apply(uly._attend(qg, kg, vg, lay, scale, backend), None, c, lay)
            out.backward(d_local)
            q_local.grad = k_local.grad = v_local.grad = None

        real_a2a = uly._all_to_all
        uly._all_to_all = lambda x, group: torch.empty_like(x).copy_(x)  # same-size local copy
        try:
            rows.append((f"ulysses rank c={c}", *_measure(ulysses_rank, args.iters, device)))
        finally:
            uly._all_to_all = real_a2a
        sent = uly.ulysses_comm_bytes(cu_c[-1], args.heads, args.kv_heads, args.head_dim, c,
                                      dtype_bytes=torch.finfo(dtype).bits // 8)  # fmt: skip
        print(
            f"ulysses c={c}: one layer fwd+bwd sends {sent / 2**20:.1f} MiB per rank (all-to-alls, not timed)"
        )

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, T={t}, docs={args.docs}, heads {args.heads}/{args.kv_heads}, d={args.head_dim}, "
          f"{args.dtype}, backend {backend}, fwd+bwd median of {args.iters}")  # fmt: skip
    base_ms = rows[0][1]
    print(f"{'row':28s} {'ms':>9s} {'vs first':>9s} {'peak MiB':>9s}")
    for label, ms, mib in rows:
        print(f"{label:28s} {ms:9.3f} {ms / base_ms:9.3f} {mib:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
