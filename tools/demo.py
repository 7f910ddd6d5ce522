"""The main job on the embedded demo data: preprocess -> plan -> train (``make demo``).

Each stage is the same command a user would type (printed before it runs), so the demo
doubles as the quickstart. Outputs land under ``runs/demo/``.

example:
  python tools/demo.py --nproc 2                 # what `make demo` runs
  python tools/demo.py --skip-train --out runs/demo_plan_only
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="training processes (CPU: gloo)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--skip-train", action="store_true", help="stop after the plan")
    args = p.parse_args(argv)

    from megatron_hbp.data import default_tokenizer_path
    from megatron_hbp.data.demo import ensure_demo_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_demo_data()
    info = out / "sample_info.npz"
    py = sys.executable
    run([py, "tools/preprocess_lengths.py", "--data", str(data), "--tokenizer", str(default_tokenizer_path()),
         "--template", "plain", "--output", str(info), "--workers", "2"])  # fmt: skip
    run([py, "tools/plan.py", "--sample-info", str(info), "--config", "configs/plan_demo.yaml",
         "--output", str(out / "plan"), "--plot"])  # fmt: skip
    if args.skip_train:
        return 0
    run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
         "examples/pretrain_llama_hbp.py", "--config", "configs/demo_tiny.yaml"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
