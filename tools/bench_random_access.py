#!/usr/bin/env python3
"""Benchmark what a training data worker pays per sample: JSONL (seek, parse, template, tokenise)
versus the token files (mmap slice), on the same samples, with a warm and a cold page cache, for
``.jsonl`` and ``.jsonl.gz`` input; plus preprocessing time and disk use with and without token
files, for both inputs.

Data: the embedded demo set (3,000 short chats + 36 long documents) unless --data is given; a
gzip copy of it (level 6) is the ``.jsonl.gz`` input. Preprocesses each input twice
(``tokens=False`` and ``tokens=True``, ``--workers`` processes), then reads the same ``--samples``
random sample indices (fixed seed) in one process (= one data worker) through ``SFTDataset``
(JSONL; for ``.gz`` through its unnamed decompressed copy, whose making is timed separately) and
``TokenDataset`` (mmap) and checks the samples are identical. Prints samples/s and tokens/s per
worker for each path, short and long samples separately.

Cold cache: before each cold pass the pages of the files that path reads (the JSONL, the
decompressed copy, or the token ``.bin`` files, unmapped first) are evicted with
``os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)``. This is best-effort: the kernel drops
only clean pages that no one maps, another process may read them back, and nothing checks what
was dropped. Reports, never asserts.

example:
  python tools/bench_random_access.py --samples 400 --repeats 3
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_hbp.data import SFTDataset, preprocess
from megatron_hbp.data.demo import ensure_demo_data
from megatron_hbp.data.token_files import TokenDataset, token_paths


def _evict_fd(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.fsync(fd)  # dirty pages (the freshly written unnamed copy) are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _evict(ds) -> None:
    """Best-effort: drop the page cache of every file ``ds`` reads (see the module docstring)."""
    if isinstance(ds, TokenDataset):
        ds.close()  # unmap first: mapped pages are not dropped
        files = [ds.paths.tokens + ".bin", ds.paths.loss_mask + ".bin"]
    else:
        copies = getattr(ds, "_copies", {})  # the unnamed copies of .gz files (no path to open)
        for f in copies.values():
            _evict_fd(f.fileno())
        files = [f for s, f in enumerate(ds.info.files) if s not in copies]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            _evict_fd(fd)
        finally:
            os.close(fd)


def _read_all(ds, idx, cold: bool) -> tuple[float, int]:
    if cold:
        _evict(ds)
    t0 = time.perf_counter()
    n = 0
    for i in idx:
        n += len(ds[int(i)])
    return time.perf_counter() - t0, n


def _disk(out: Path, tokens: bool) -> int:
    disk = out.stat().st_size
    if tokens:
        disk += sum(os.path.getsize(f) for f in token_paths(out).files())
    return disk


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
        gz = []
        for i, f in enumerate(data):
            g = Path(tmp) / f"input{i}.jsonl.gz"
            with open(f, "rb") as src, gzip.open(g, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            gz.append(str(g))
        inputs = {"jsonl": data, "jsonl.gz": gz}
        best: dict[tuple[str, bool], tuple[float, int]] = {}
        infos = {}
        for _ in range(args.repeats):  # interleaved; the fastest run of each counts
            for kind, files in inputs.items():
                for tokens in (False, True):
                    out = Path(tmp) / kind.replace(".", "_") / f"si_{int(tokens)}.npz"
                    t0 = time.perf_counter()
                    info = preprocess(
                        files, out, template=args.template, workers=args.workers, tokens=tokens, force=True,
                        progress=False,
                    ).info  # fmt: skip
                    secs = time.perf_counter() - t0
                    key, cur = (kind, tokens), (secs, _disk(out, tokens))
                    best[key] = min(best.get(key, cur), cur)
                    infos[key] = info
        info = infos[("jsonl", True)]
        sizes = {k: sum(os.path.getsize(f) for f in v) for k, v in inputs.items()}
        print(f"\ninput {sizes['jsonl'] / 1e6:.2f} MB .jsonl, {sizes['jsonl.gz'] / 1e6:.2f} MB .jsonl.gz; "
              f"{len(info):,} samples, {int(info.lengths.sum()):,} tokens; {args.workers} preprocessing "
              f"workers; fastest of {args.repeats}")  # fmt: skip
        print("\n| preprocessing | input | wall s | disk (sample info + token files) |\n|---|---|---:|---:|")
        for (kind, tokens), (secs, disk) in best.items():
            label = "with tokens (default)" if tokens else "--no-tokens"
            print(f"| {label} | .{kind} | {secs:.2f} | {disk / 1e6:.2f} MB |")

        t0 = time.perf_counter()
        gz_ds = SFTDataset(infos[("jsonl.gz", False)])  # prints the copy's size
        make_copy = time.perf_counter() - t0
        jsonl, mm = SFTDataset(infos[("jsonl", False)]), TokenDataset(info)
        print(
            f"the .jsonl.gz JSONL path: unnamed decompressed copy made in {make_copy:.2f} s (once per process)"
        )

        rng = np.random.default_rng(0)
        lengths = np.asarray(info.lengths)
        idx = rng.choice(len(lengths), min(args.samples, len(lengths)), replace=False)
        for i in idx[:50]:  # same samples, same ids and masks on every path
            a, b, c = jsonl[int(i)], mm[int(i)], gz_ds[int(i)]
            assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.loss_mask, b.loss_mask)
            assert np.array_equal(a.input_ids, c.input_ids) and np.array_equal(a.loss_mask, c.loss_mask)
        print(f"\n| random access, 1 worker ({len(idx)} samples, seed 0) | cache | samples | samples/s | "
              "tokens/s | ms/sample |\n|---|---|---:|---:|---:|---:|")  # fmt: skip
        paths = (
            ("JSONL (SFTDataset), .jsonl", jsonl),
            ("JSONL (SFTDataset), .jsonl.gz copy", gz_ds),
            ("token files (TokenDataset, mmap)", mm),
        )
        for label, sel in (
            ("all", idx),
            (f"short (< {args.long} tokens)", idx[lengths[idx] < args.long]),
            (f"long (>= {args.long} tokens)", idx[lengths[idx] >= args.long]),
        ):
            if not sel.size:
                continue
            for cold in (False, True):
                for name, ds in paths:
                    secs, toks = min(_read_all(ds, sel, cold) for _ in range(args.repeats))
                    print(
                        f"| {label}: {name} | {'cold' if cold else 'warm'} | {sel.size} | {sel.size / secs:,.0f} "
                        f"| {toks / secs:,.0f} | {1e3 * secs / sel.size:.3f} |"
                    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
