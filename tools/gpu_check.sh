#!/usr/bin/env bash
# Every GPU check of this project as ONE device run (fits the 10-minute command limit and the
# 15-minute device budget of a session; see BENCHMARKS.md "GPU: ready, not yet run").
#
# Here, once (the wheel travels in the ignored folder .whl/, named in `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.19.2
# On the device (run tool, carry [".whl"], timeout_s 600):  bash tools/gpu_check.sh
# Results land in $OUT (at most 8 files): copy them into BENCHMARKS.md with card, date, command.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$OUT/env.txt" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/env.txt" 2>&1
python3 -c "import megatron.core, megatron_hbp.kernels; print('megatron-core', megatron.core.__version__)" >> "$OUT/env.txt" 2>&1

step() {  # step NAME SECONDS CMD...: run with a time limit, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/summary.txt"
}

# Correctness first (compiled kernels, varlen attention vs SDPA, CP varlen path), then timings.
step gpu_tests 150 python3 -m pytest -q -m gpu -x kernels/tests tests/test_mcore_attention.py tests/test_cp_attention.py
step bench_cross_entropy 120 python3 kernels/bench_cross_entropy.py
step bench_attention_cost 60 python3 kernels/bench_attention_cost.py
step bench_cp 45 python3 -m megatron_hbp.cp.bench
step bench_train 170 python3 tools/bench_train_gpu.py --out "$OUT/train_runs"
rm -rf "$OUT/train_runs"
