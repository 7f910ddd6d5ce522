"""MeasuredProfiler (megatron_hbp.mcore.profiler): layering, its CPU error, and its training path.

The GPU measurement itself cannot run here; the CPU test runs the same setup and iteration
(Megatron DDP + Megatron Adam + forward_backward_func + optimizer step) in fp32 and checks that
what the GPU peak must include is really allocated: a full fp32 gradient buffer and both Adam
moments for every parameter, against a parameter count computed by hand.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_costmodel_imports_neither_torch_nor_megatron():
    out = _python(
        "import sys, megatron_hbp.costmodel as c\n"
        "assert not hasattr(c, 'MeasuredProfiler')\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'megatron.'))))"
    )
    assert out.strip() == "[]", out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_profile_without_cuda_is_a_clear_error():
    from megatron_hbp.mcore.profiler import MeasuredProfiler

    prof = MeasuredProfiler("tiny")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*AnalyticProfiler"):
        prof.profile([np.array([8, 8])], 16, 1, 0)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        prof.memory_budget_bytes  # noqa: B018


# tiny preset by hand: vocab 32000, hidden 64, 4 query heads / 2 KV groups of head_dim 16,
# ffn 176 (gated: fc1 is 64 x 2*176), 2 layers, untied embeddings, RMSNorm weights only
_PER_LAYER = 64 * (4 * 16 + 2 * 2 * 16) + 64 * 64 + 64 * 2 * 176 + 176 * 64 + 2 * 64
TINY_PARAMS = 2 * 32000 * 64 + 2 * _PER_LAYER + 64  # = 4_188_480

CPU_RUN = """
import json, numpy as np, torch
from megatron_hbp.mcore.profiler import MeasuredProfiler
prof = MeasuredProfiler("tiny", attention_backend="sdpa")
model, opt = prof.setup("cpu", torch.float32)
reports = prof.forward_backward(prof.make_inputs([np.array([40, 23]), np.array([64])]))
opt.step()
grad = [b.grad_data for b in model.buffers]
opts = getattr(opt, "chained_optimizers", [opt])
moments = [t for o in opts for st in o.optimizer.state.values() for k, t in st.items()
           if k in ("exp_avg", "exp_avg_sq")]
print(json.dumps({
    "micro_batches": len(reports),
    "params": sum(p.numel() for p in model.module.parameters()),
    "grad_numel": sum(g.numel() for g in grad), "grad_dtypes": sorted({str(g.dtype) for g in grad}),
    "moment_numel": sum(t.numel() for t in moments), "moment_dtypes": sorted({str(t.dtype) for t in moments}),
}))
"""


@pytest.mark.slow
def test_training_path_holds_grad_buffer_and_adam_moments_on_cpu():
    assert TINY_PARAMS == 4_188_480
    r = json.loads(_python(CPU_RUN).strip().splitlines()[-1])
    assert r["micro_batches"] == 2  # one micro-batch per pack
    assert r["params"] == TINY_PARAMS
    # an fp32 gradient buffer covering every parameter (Megatron pads buckets slightly) ...
    assert TINY_PARAMS <= r["grad_numel"] <= TINY_PARAMS * 1.01 and r["grad_dtypes"] == ["torch.float32"]
    # ... and both fp32 Adam moments of every parameter: 16 B/param here, 18 B/param in bf16 on a GPU
    assert r["moment_numel"] == 2 * TINY_PARAMS and r["moment_dtypes"] == ["torch.float32"]


@pytest.mark.slow
def test_bench_recompute_cpu_smoke_measures_the_grid(tmp_path):
    """tools/bench_recompute_gpu.py on CPU: the whole calibration grid is measured through
    MeasuredProfiler(device="cpu") (real iterations), each row with the tokens of its packs."""
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_recompute_gpu.py", "--cpu-smoke", "--iterations", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    rows = r["rows"]
    # 2 pack lengths x {all, half, 0} of the tiny preset's 2 layers (most recomputed first)
    assert [(x["pack_length"], x["recompute_layers"]) for x in rows] == [
        (256, 2), (256, 1), (256, 0), (512, 2), (512, 1), (512, 0),
    ]  # fmt: skip
    assert not any(x["oom"] for x in rows)
    for x in rows:
        assert 0 < x["tokens"] <= x["packs"] * x["pack_length"]
        assert x["docs"] >= x["packs"] and x["time_s"] > 0
        assert np.isnan(x["peak_gib"])  # no device memory counter on CPU
        assert x["modelled_gib"] > 0
    # the same packs per pack length whatever the recompute setting
    assert len({(x["tokens"], x["docs"]) for x in rows if x["pack_length"] == 512}) == 1
    assert "recompute trade-off at 512 tokens/pack" in proc.stdout
