"""Activation memory model against a measured CPU run of the tiny Megatron model (issue 7).

Measured = what autograd keeps for the backward pass: the bytes of every distinct storage saved
during the forward (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, as in
tests/cp/test_cp_recompute.py. Per-layer bytes come from the difference between a 4-layer and a
2-layer model on the same packed batch, so embeddings, final norm and loss cancel. The model runs
with the trainer's own builder and ``set_recompute`` on three packs of different document lengths
(so the math attention's sum-of-l^2 term is exercised), in fp32 and, for one pack, bf16.

The cost model is told which code path runs (``CPU_SDPA``: SDPA math attention, unfused RMSNorm,
RoPE and SwiGLU; see the ``TrainingSetup`` knobs); every term is a tensor shape that path saves
(module docstring of ``megatron_hbp.costmodel.model``), nothing is fitted to this measurement.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel import CostModel, TrainingSetup
from megatron_hbp.model_config import load_model_config
from tests.distributed import run_command

ROOT = Path(__file__).resolve().parents[2]
PACKS = {
    "mixed": [301, 77, 1, 133, 512],
    "one_long": [1024],
    "many_short": [16] * 40 + [64] * 6,
}
BF16_PACK = "mixed"
CPU_SDPA = dict(attention_impl="math", rmsnorm_impl="unfused", rope_impl="unfused", swiglu_impl="unfused")


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
    out = {}
    for dtype_name, dtype, packs in (
        ("fp32", torch.float32, list(PACKS)),
        ("bf16", torch.bfloat16, [BF16_PACK]),
    ):
        for layers in (2, 4):
            model_parallel_cuda_manual_seed(0)
            torch.manual_seed(0)
            model = build_model(
                replace(load_model_config("tiny"), num_layers=layers), attention_backend="sdpa", dtype=dtype
            )
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            for pack_name in packs:
                lengths = PACKS[pack_name]
                docs = [(rng.integers(5, 1000, n), np.ones(n, np.uint8)) for n in lengths]
                inputs = to_model_inputs(build_packed_batch(docs, lengths), "cpu")
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
                    out[f"{dtype_name}_{pack_name}_{layers}_{k}"] = int(sum(seen.values()))
    Path(out_path).write_text(json.dumps(out))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("mem") / "saved.json"
    env = dict.fromkeys(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))  # removed
    cmd = [
        sys.executable,
        "-c",
        f"import tests.costmodel.test_costmodel_memory as m; m._worker({str(out)!r})",
    ]
    run_command(cmd, timeout=600, env=env)  # tests/distributed.py
    return json.loads(out.read_text())


def _model(activation_bytes: int = 4, **knobs):
    setup = TrainingSetup(activation_bytes=activation_bytes, **knobs)
    return CostModel(load_model_config("tiny"), "h100_sxm", num_gpus=1, setup=setup)


CASES = [("fp32", p) for p in PACKS] + [("bf16", BF16_PACK)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,pack", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_recomputed_layer_keeps_only_its_input(measured, dtype, pack):
    """With every layer recomputed, each layer keeps its input (h values per token), as the model says."""
    tokens = sum(PACKS[pack])
    cm = _model(4 if dtype == "fp32" else 2, **CPU_SDPA)
    model_ckpt = cm.checkpoint_layer_bytes_per_token() * tokens
    meas_ckpt = (measured[f"{dtype}_{pack}_4_4"] - measured[f"{dtype}_{pack}_2_2"]) / 2
    print(
        f"\nrecomputed layer {dtype} {pack}: model {model_ckpt:.0f} B, measured {meas_ckpt:.0f} B "
        f"({meas_ckpt / model_ckpt - 1:+.1%})"
    )
    assert abs(meas_ckpt / model_ckpt - 1) <= 0.20


@pytest.mark.slow
@pytest.mark.parametrize("dtype,pack", CASES, ids=[f"{d}-{p}" for d, p in CASES])
def test_full_layer_activation_bytes_within_20_percent(measured, dtype, pack):
    """A full layer of the CPU path (SDPA math attention per document, unfused norm/RoPE/SwiGLU)
    against the model told that path; the default (GPU: flash, fused) model is printed for
    reference only, it describes another code path."""
    lengths = PACKS[pack]
    tokens, sq = sum(lengths), sum(n * n for n in lengths)
    b = 4 if dtype == "fp32" else 2
    model_full = float(_model(b, **CPU_SDPA).full_layer_bytes(tokens, sq))
    gpu_path = float(_model(b).full_layer_bytes(tokens, sq))
    meas_full = (measured[f"{dtype}_{pack}_4_0"] - measured[f"{dtype}_{pack}_2_0"]) / 2
    print(
        f"\nfull layer {dtype} {pack}: measured {meas_full:.0f} B; CPU-path model {model_full:.0f} B "
        f"({meas_full / model_full - 1:+.1%}); GPU-path model {gpu_path:.0f} B ({meas_full / gpu_path - 1:+.1%})"
    )
    assert abs(meas_full / model_full - 1) <= 0.20


@pytest.mark.slow
def test_memory_total_uses_the_pack_lengths(measured):
    """``memory`` with the CPU knobs: the activation difference between 4 and 2 full layers is two
    measured full layers (the rest of the model cancels)."""
    lengths = PACKS["one_long"]
    tokens, sq = sum(lengths), sum(n * n for n in lengths)
    l2 = replace_layers(2, **CPU_SDPA).memory(tokens, 1, 0, sum_sq_lengths=sq).activations
    l4 = replace_layers(4, **CPU_SDPA).memory(tokens, 1, 0, sum_sq_lengths=sq).activations
    meas = measured["fp32_one_long_4_0"] - measured["fp32_one_long_2_0"]
    assert abs(meas / (l4 - l2) - 1) <= 0.20


def replace_layers(layers: int, **knobs):
    cfg = replace(load_model_config("tiny"), num_layers=layers)
    return CostModel(cfg, "h100_sxm", num_gpus=1, setup=TrainingSetup(activation_bytes=4, **knobs))


def test_cpu_knobs_against_hand_count():
    """Tiny model (h 64, f 176, a 4, g 2, d 16), fp32, counted by hand from the saved shapes:
    norms 2 (8h + 4 + 4h) = 1544, RoPE cos/sin 4 x 4d = 256, math q/K^T/V 3 x 4 x 64 = 768,
    attention output 4 x 64 = 256, SwiGLU 5 x 4 x 176 = 3520 -> 6344 B per token; probabilities
    4 x 4 = 16 B per element of each l x l matrix."""
    cm = _model(4, **CPU_SDPA)
    assert cm.full_layer_bytes_per_token() == 6344
    assert cm.full_layer_bytes_per_sq_length() == 16
    assert cm.full_layer_bytes(100, 5000) == 6344 * 100 + 16 * 5000
    # bf16: norm and math terms stay fp32, the rest halves: 2 (8h+4 + 2h) + 256 + 768 + 128 + 1760
    assert _model(2, **CPU_SDPA).full_layer_bytes_per_token() == 2 * (512 + 4 + 128) + 256 + 768 + 128 + 1760
    # defaults (the GPU path) do not change: 4 (4h + 2q + 2kv + 3f) + 4a, fp32
    assert _model(4).full_layer_bytes_per_token() == 4 * (256 + 128 + 64 + 528) + 16
    assert _model(4).full_layer_bytes_per_sq_length() == 0
    # varlen: K/V expanded to 4 heads, 2 kv -> 2 q
    assert (
        _model(4, attention_expand_kv=True).full_layer_bytes_per_token() == 4 * (256 + 128 + 128 + 528) + 16
    )
    # no GQA (a = g = 4) in fp32: V is a view of the fused QKV output (q + 2 kv = 192 values)
    mha = CostModel(
        replace(load_model_config("tiny"), num_query_groups=4),
        "h100_sxm",
        num_gpus=1,
        setup=TrainingSetup(activation_bytes=4, attention_impl="math"),
    )
    assert mha.full_layer_bytes_per_token() == 4 * (4 * 64) + 4 * (2 * 64 + 192) + 4 * 64 + 4 * 3 * 176


def test_math_attention_needs_lengths_and_cp1():
    cm = _model(4, **CPU_SDPA)
    with pytest.raises(ValueError, match="sum_sq_lengths"):
        cm.memory(1024, 1, 0)
    with pytest.raises(ValueError, match="cp == 1"):
        cm.memory(1024, 2, 0, sum_sq_lengths=10)
    # the recompute search sees the l^2 term: brute force over k for budgets around each M(k)
    cm = replace_layers(8, memory_reserve_gib=0.0, **CPU_SDPA)
    for sq in (1024, 1024**2):
        mem = [cm.memory(1024, 1, k, sum_sq_lengths=sq).total for k in range(9)]
        for budget in sorted(mem) + [min(mem) - 1]:
            want = next((k for k in range(9) if mem[k] <= budget), None)
            assert cm.min_recompute_layers(1024, 1, budget, sum_sq_lengths=sq) == want, (sq, budget)


@pytest.mark.parametrize(
    "knobs,msg",
    [
        (dict(attention_impl="sdpa"), "attention_impl must be one of flash, math"),
        (dict(rope_impl="fast"), "rope_impl"),
        (dict(swiglu_impl="x"), "swiglu_impl"),
        (dict(rmsnorm_impl="apex"), "rmsnorm_impl"),
        (dict(attention_impl="math", attention_expand_kv=True), "attention_expand_kv"),
        (dict(activation_bytes=3), "activation_bytes"),
    ],
)
def test_bad_knobs_are_named(knobs, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainingSetup(**knobs)
