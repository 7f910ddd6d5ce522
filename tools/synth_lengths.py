#!/usr/bin/env python
"""Write synthetic per-sample lengths (.npy, int32) from a named distribution.

  python tools/synth_lengths.py tulu3_longcite --output cache/tulu3_longcite.npy
  python tools/synth_lengths.py tulu3_longcite --scale 10 --output cache/tulu3_10m.npy   # ~10M samples

Distributions (megatron_hbp.planner.synth.DISTRIBUTIONS):
  tulu3_longcite  1,000,000 short log-normal (median 400, sigma 1.0, clipped [16, 32768])
                  + 2,000 long uniform in [16K, 128K]   (x scale)
  short_chat      100,000 log-normal (median 600, sigma 0.8, clipped [8, 16384]) (x scale)
  long_mix        100,000: 90% log-normal (median 1K, sigma 1.2, <= 64K) + 10% uniform [8K, 64K] (x scale)
  chat_heavy      600,000: 96% chat (median 500, sigma 0.9, <= 16K) + 3.9% long chats (median 6K,
                  sigma 0.6, 2K-32K) + 0.1% uniform [32K, 128K] (x scale)
  code_long       60,000: 75% code (median 2.5K, sigma 1.1, <= 64K) + 25% uniform [16K, 128K] (x scale)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from megatron_hbp.planner.synth import DISTRIBUTIONS, synth_lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(DISTRIBUTIONS), help="distribution")
    p.add_argument("--output", type=Path, required=True, help="output .npy path")
    p.add_argument("--seed", type=int, default=0, help="numpy Generator seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the sample counts (default 1)")
    a = p.parse_args(argv)
    lengths = synth_lengths(a.name, a.seed, a.scale)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    np.save(a.output, lengths)
    q = np.percentile(lengths, [50, 90, 99, 99.9])
    print(
        f"wrote {a.output}: {len(lengths)} samples, {int(lengths.sum(dtype=np.int64))} tokens, "
        f"median {q[0]:.0f}, p90 {q[1]:.0f}, p99 {q[2]:.0f}, p99.9 {q[3]:.0f}, max {int(lengths.max())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
