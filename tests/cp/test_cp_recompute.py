"""Per-group recompute switch on the tiny Megatron model: same outputs and gradients, less memory.

Activation memory is measured as what autograd keeps for the backward pass: the bytes of
every distinct tensor saved during the forward (``torch.autograd.graph.saved_tensors_hooks``),
parameters excluded. With full recompute of ``k`` layers Megatron keeps only each
recomputed layer's input, so the saved bytes must fall as ``k`` grows while the loss and
every gradient stay the same. The model runs in a subprocess (the CPU shim and Megatron's
parallel state are process-wide); the trainer's public builder and ``set_recompute`` are used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = (0, 1, 2, 4)
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
    from megatron_hbp.model_config import load_model_config

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    cfg = replace(
        load_model_config("tiny"), num_layers=4, vocab_size=1024
    )  # small vocab: fast, layers dominate
    model = build_model(cfg, attention_backend="sdpa")
    rng = np.random.default_rng(0)
    lengths = [301, 77, 1, 133]
    docs = [(rng.integers(5, 1000, n), (rng.random(n) < 0.7).astype(np.uint8)) for n in lengths]
    inputs = to_model_inputs(build_packed_batch(docs, lengths), "cpu")
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}

    results = {}
    for k in SETTINGS:
        set_recompute(model, k)
        model.zero_grad(set_to_none=True)
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = token_losses(model, inputs)
            loss = (losses.float().reshape(-1) * inputs["loss_weight"].reshape(-1)).sum()
        loss.backward()
        results[k] = {
            "loss": float(loss),
            "saved_bytes": int(sum(seen.values())),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("recompute") / "results.pt"
    run_command([sys.executable, __file__, out], timeout=600)  # tests/distributed.py
    return torch.load(out)


def test_recompute_keeps_loss_and_gradients(results):
    base = results[0]
    assert base["loss"] > 0
    for k in SETTINGS[1:]:
        assert abs(results[k]["loss"] - base["loss"]) <= 1e-6 * abs(base["loss"]), k
        for name, g in base["grads"].items():
            scale = float(g.abs().max())
            assert scale > 0, name
            assert float((results[k]["grads"][name] - g).abs().max()) <= 1e-6 * scale, (k, name)


def test_recompute_lowers_activation_memory(results):
    saved = [results[k]["saved_bytes"] for k in SETTINGS]
    print("saved activation bytes per recomputed layers:", json.dumps(dict(zip(SETTINGS, saved))))
    assert all(a > b for a, b in zip(saved, saved[1:])), saved
    # Each recomputed layer drops roughly the same amount (its internals minus its input).
    per_layer = [saved[0] - saved[1], (saved[1] - saved[2]), (saved[2] - saved[3]) / 2]
    assert max(per_layer) <= 1.5 * min(per_layer), per_layer


if __name__ == "__main__":
    _worker(sys.argv[1])
