#!/usr/bin/env bash
# Every GPU check of this project as ONE device run (fits the 10-minute command limit and the
# 15-minute device budget of a session; BENCHMARKS.md has the results of earlier runs).
#
# Here, once (the wheel travels in the ignored folder .whl/, named in `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.19.2
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl mistral-common==1.12.0   # default tokenizer
# On the device (run tool, carry [".whl"], timeout_s 600):  bash tools/gpu_check.sh [BUDGET_S] [STEPS]
#   BUDGET_S (default 500): the steps share it in order; each gets min(its limit, what is left).
#   Env: RECOMPUTE_ARGS (extra options of bench_recompute_gpu.py), TRAIN_SAMPLES (default: all).
#   STEPS (default all): comma-separated subset of
#         gpu_tests,bench_cp,bench_recompute,bench_cross_entropy,bench_attention_cost,bench_train
# Results land in $OUT (8 files at most: summary.txt, one .txt per step, bench_recompute.json).
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
BUDGET=${1:-500}
STEPS=${2:-all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T0=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
    { echo "editable install failed: linking megatron_hbp/kernels instead"; ln -sfn ../kernels megatron_hbp/kernels; }
  python3 -c "import megatron.core, megatron_hbp.kernels; print('megatron-core', megatron.core.__version__)"
  echo "setup took $(($(date +%s) - T0)) s"
} > "$OUT/summary.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME LIMIT CMD...: run with min(LIMIT, budget left), keep going on failure
  local name=$1 limit=$2; shift 2
  if [[ $STEPS != all && ,$STEPS, != *,$name,* ]]; then return; fi
  local left=$((BUDGET - ($(date +%s) - T0)))
  ((left < limit)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: SKIPPED, budget spent" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/summary.txt"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? after $(($(date +%s) - t)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.txt" | sed 's/^/   | /' | tee -a "$OUT/summary.txt"
}

# Correctness first (compiled kernels, varlen attention vs SDPA, CP varlen path), then timings,
# most wanted first: CP c=1 overhead and the recompute trade-off (issue 6), the kernels, training.
step gpu_tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels tests/mcore/test_mcore_attention.py tests/cp/test_cp_attention.py tests/cp/test_cp_ulysses.py
step bench_cp 180 bash -c "python3 -m megatron_hbp.cp.bench --cp 1 2 4 8 --iters 10 && python3 -m megatron_hbp.cp.bench --tokens 131072 --docs 4 --cp 1 2 4 8 --iters 10 && python3 -m megatron_hbp.cp.bench --tokens 131072 --docs 400 --cp 1 2 4 8 --iters 10"
# shellcheck disable=SC2086  # RECOMPUTE_ARGS: extra options, e.g. "--single-doc --pack-lengths 8192,32768"
step bench_recompute 150 python3 tools/bench_recompute_gpu.py --json "$OUT/bench_recompute.json" ${RECOMPUTE_ARGS:-}
step bench_cross_entropy 120 python3 kernels/bench_cross_entropy.py
# shellcheck disable=SC2086  # ATTN_COST_ARGS: e.g. --sweep
step bench_attention_cost 60 python3 kernels/bench_attention_cost.py ${ATTN_COST_ARGS:-}
# shellcheck disable=SC2086  # TRAIN_SAMPLES: first N demo samples only (default: all 3036)
step bench_train 240 python3 tools/bench_train_gpu.py ${TRAIN_SAMPLES:+--max-samples $TRAIN_SAMPLES} --out /tmp/train_runs
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/summary.txt"
