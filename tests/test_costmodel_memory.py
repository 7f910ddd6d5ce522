"""Activation memory model against a measured CPU run of the tiny Megatron model (issue 7).

Measured = what autograd keeps for the backward pass: the bytes of every distinct storage saved
during the forward (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, as in
tests/test_cp_recompute.py. Per-layer bytes come from the difference between a 4-layer and a
2-layer model on the same packed batch, so embeddings, final norm and loss cancel. The model runs
fp32 on CPU (``activation_bytes=4``) with the trainer's own builder and ``set_recompute``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hbp.costmodel import CostModel, TrainingSetup
from megatron_hbp.model_config import load_model_config

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [301, 77, 1, 133, 512]
pytestmark = pytest.mark.slow


def _worker(out_path: str) -> None:
    from dataclasses import replace

    import numpy as np
    import torch

    from megatron_hbp.mcore.train import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_hbp.mcore.batch import build_packed_batch, to_model_inputs
    from megatron_hbp.mcore.loss import token_losses
    from megatron_hbp.mcore.model import build_model, set_recompute

    parallel_state.initialize_model_parallel(1, 1)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(5, 1000, n), np.ones(n, np.uint8)) for n in LENGTHS]
    out = {}
    for layers in (2, 4):
        model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        model = build_model(replace(load_model_config("tiny"), num_layers=layers), attention_backend="sdpa")
        inputs = to_model_inputs(build_packed_batch(docs, LENGTHS), "cpu")
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for k in (0, layers):
            set_recompute(model, k)
            seen: dict[int, int] = {}

            def pack(t, seen=seen, params=params):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in params:
                    seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                losses = token_losses(model, inputs)
                loss = (losses.float().reshape(-1) * inputs["loss_weight"].reshape(-1)).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            out[f"{layers}_{k}"] = int(sum(seen.values()))
    Path(out_path).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "saved.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    code = f"import tests.test_costmodel_memory as m; m._worker({str(out)!r})"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def _model():
    return CostModel(
        load_model_config("tiny"), "h100_sxm", num_gpus=1, setup=TrainingSetup(activation_bytes=4)
    )


def test_recomputed_layer_keeps_only_its_input(measured):
    """With every layer recomputed, each layer keeps its input (h values per token), as the model says."""
    tokens = sum(LENGTHS)
    model_ckpt = _model().checkpoint_layer_bytes_per_token() * tokens
    meas_ckpt = (measured["4_4"] - measured["2_2"]) / 2
    print(
        f"\nrecomputed layer: model {model_ckpt:.0f} B, measured {meas_ckpt:.0f} B ({meas_ckpt / model_ckpt - 1:+.1%})"
    )
    assert abs(meas_ckpt / model_ckpt - 1) <= 0.20


@pytest.mark.xfail(
    strict=True,
    reason="the CPU local-spec path stores what the GPU path does not: SDPA's math kernel saves the "
    "[heads, n, n] probabilities of every document, the unfused SwiGLU saves silu(x1) and the product "
    "separately, RoPE/GQA make copies; the model describes FlashAttention + fused SwiGLU (measured ~3x)",
)
def test_full_layer_activation_bytes_within_20_percent(measured):
    tokens = sum(LENGTHS)
    model_full = _model().full_layer_bytes_per_token() * tokens
    meas_full = (measured["4_0"] - measured["2_0"]) / 2
    print(
        f"\nfull layer: model {model_full:.0f} B, measured {meas_full:.0f} B ({meas_full / model_full - 1:+.1%})"
    )
    assert abs(meas_full / model_full - 1) <= 0.20
