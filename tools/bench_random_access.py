#!/usr/bin/env python3
"""Benchmark what a training data worker pays per sample: JSONL (seek, parse, template, tokenise)
versus the token files (mmap slice), on the same samples, plus preprocessing time and disk use
with and without token files.

Data: the embedded demo set (3,000 short chats + 36 long documents) unless --data is given.
Preprocesses it twice (``tokens=False`` and ``tokens=True``, ``--workers`` processes), then reads
the same ``--samples`` random sample indices (fixed seed) in one process (= one data worker)
through ``SFTDataset`` (JSONL) and ``TokenDataset`` (mmap; the page cache is warm: the files were
just written) and checks every sample is identical. Prints samples/s and tokens/s per worker for
each path, short and long samples separately. Reports, never asserts.

example:
  python tools/bench_random_access.py --samples 400
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_hbp.data import SFTDataset, preprocess
from megatron_hbp.data.demo import ensure_demo_data
from megatron_hbp.data.token_files import TokenDataset, token_paths


def _read_all(ds, idx) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for i in idx:
        n += len(ds[int(i)])
    return time.perf_counter() - t0, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=None, help="JSONL files (default: the demo data)")
    p.add_argument("--template", default="plain")
    p.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    p.add_argument("--samples", type=int, default=400, help="random samples read by each path")
    p.add_argument("--long", type=int, default=8192, help="a sample of at least this many tokens is 'long'")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest counts")
    args = p.parse_args(argv)
    data = args.data or [str(ensure_demo_data())]
    print(f"{os.cpu_count()} CPUs; load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        best: dict[bool, tuple[float, int]] = {}
        for _ in range(args.repeats):  # interleaved; the fastest run of each counts
            for tokens in (False, True):
                out = Path(tmp) / f"si_{int(tokens)}.npz"
                t0 = time.perf_counter()
                info = preprocess(
                    data, out, template=args.template, workers=args.workers, tokens=tokens, force=True,
                    progress=False,
                ).info  # fmt: skip
                secs = time.perf_counter() - t0
                disk = out.stat().st_size
                if tokens:
                    disk += sum(os.path.getsize(f) for f in token_paths(out).files())
                best[tokens] = min(best.get(tokens, (secs, disk)), (secs, disk))
        rows = [(t, *best[t]) for t in (False, True)]
        print(f"\ninput {sum(os.path.getsize(f) for f in data) / 1e6:.1f} MB, {len(info):,} samples, "
              f"{int(info.lengths.sum()):,} tokens; {args.workers} preprocessing workers")  # fmt: skip
        print("| preprocessing | wall s | disk (sample info + token files) |\n|---|---|---|")
        for tokens, secs, disk in rows:
            print(
                f"| {'with tokens (default)' if tokens else '--no-tokens'} | {secs:.2f} | {disk / 1e6:.2f} MB |"
            )

        rng = np.random.default_rng(0)
        lengths = np.asarray(info.lengths)
        idx = rng.choice(len(lengths), min(args.samples, len(lengths)), replace=False)
        jsonl, mm = SFTDataset(info), TokenDataset(info)
        for i in idx[:50]:  # same samples, same ids and masks
            a, b = jsonl[int(i)], mm[int(i)]
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
        print(
            f"\n| random access, 1 worker ({len(idx)} samples, seed 0) | samples | samples/s | tokens/s | ms/sample |"
        )
        print("|---|---|---|---|---|")
        for label, sel in (
            ("all", idx),
            (f"short (< {args.long} tokens)", idx[lengths[idx] < args.long]),
            (f"long (>= {args.long} tokens)", idx[lengths[idx] >= args.long]),
        ):
            if not sel.size:
                continue
            for name, ds in (("JSONL (SFTDataset)", jsonl), ("token files (TokenDataset, mmap)", mm)):
                best = min(_read_all(ds, sel) for _ in range(args.repeats))
                secs, toks = best
                print(
                    f"| {label}: {name} | {sel.size} | {sel.size / secs:,.0f} | {toks / secs:,.0f} "
                    f"| {1e3 * secs / sel.size:.3f} |"
                )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
