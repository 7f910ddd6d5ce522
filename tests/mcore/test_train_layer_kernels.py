"""The trainer with the Triton layer kernels (issue 17): ``layer_kernels: triton`` and
``loss_impl: fused`` under ``TRITON_INTERPRET=1`` on CPU against the torch path
(``layer_kernels: torch``, ``loss_impl: megatron``), fp32, 2 plan steps of a tiny model.

The comparison runs in a subprocess (this file as a script: Megatron's CPU shim, the
interpreter's unchecked memory accesses). It asserts equal losses and gradients (every
parameter, steps 0 and 1, after the optimizer update of step 0; layer 0 of 2 recomputed) to
1e-5 relative, and that
every Triton kernel actually ran (launch counters on the launchers): RMSNorm, SwiGLU, RoPE
forward and backward and the fused cross-entropy forward and backward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.distributed import run_command
from tests.mcore.test_train_dist import WORDS  # the same 16-word vocabulary

ROOT = Path(__file__).resolve().parents[2]


def _worker(work: Path) -> None:
    import torch

    from megatron_hbp.kernels.cross_entropy import kernel as ce
    from megatron_hbp.kernels.rmsnorm import kernel as rms
    from megatron_hbp.kernels.rope import kernel as rope
    from megatron_hbp.kernels.swiglu import kernel as glu
    from megatron_hbp.mcore.config import DataConfig, OptimizerConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import run

    calls: dict[str, int] = {}

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        setattr(module, name, wrapper)

    for module, name in [
        (rms, "rms_norm_fwd"),
        (rms, "rms_norm_bwd"),
        (glu, "swiglu_fwd"),
        (glu, "swiglu_bwd"),
        (rope, "rope_qk"),
        (ce, "_stats_triton_linear"),
        (ce, "_dlogits_triton_linear"),
    ]:
        counted(module, name)

    results = {}
    for name, layer_kernels, loss_impl in (("torch", "torch", "megatron"), ("triton", "triton", "fused")):
        grads: dict = {}

        def hook(step, model, grads=grads):
            grads[step] = {
                n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
                for n, p in model.module.named_parameters()
            }

        kinds = {}

        cfg = TrainConfig(
            model=str(work / "model.yaml"),
            data=DataConfig(sample_info=str(work / "info.npz"), num_workers=0),
            plan=PlanSource(path=str(work / "plan.npz")),
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1, clip_grad=1.0),
            dtype="fp32",
            max_steps=2,
            attention_backend="sdpa",
            layer_kernels=layer_kernels,
            loss_impl=loss_impl,
        )
        before = dict(calls)
        records = run(cfg, on_grads=hook)
        torch.save(grads, work / f"grads_{name}.pt")
        kinds = {k: calls.get(k, 0) - before.get(k, 0) for k in calls}
        results[name] = {"losses": [r["loss"] for r in records], "calls": kinds}
    results["bf16"] = _bf16_model_errors()
    (work / "result.json").write_text(json.dumps(results))


def _bf16_model_errors() -> dict:
    """One packed micro-batch (documents of 61, 1, 1, 33, 30 tokens) through the tiny model
    (vocabulary 256) in fp32 with the torch layers (the reference), in bf16 with the torch
    layers + Megatron CE, and in bf16 with the Triton layers + the Triton fused CE. Returns each
    bf16 run's relative loss error and its largest per-parameter gradient error."""
    from dataclasses import replace

    import numpy as np
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_hbp.mcore.batch import build_packed_batch, to_model_inputs
    from megatron_hbp.mcore.loss import token_losses
    from megatron_hbp.mcore.model import build_model
    from megatron_hbp.model_config import load_model_config

    cfg = replace(load_model_config("tiny"), vocab_size=256)
    rng = np.random.default_rng(0)
    lengths = [61, 1, 1, 33, 30]
    docs = [(rng.integers(5, 250, n), (rng.random(n) < 0.7).astype(np.uint8)) for n in lengths]
    inputs = to_model_inputs(build_packed_batch(docs, lengths), "cpu")
    runs = {}
    for name, layer_kernels, impl, backend, dtype in (
        ("fp32", "torch", "megatron", "auto", torch.float32),
        ("torch_bf16", "torch", "megatron", "auto", torch.bfloat16),
        ("triton_bf16", "triton", "fused", "triton", torch.bfloat16),
    ):
        model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        model = build_model(cfg, attention_backend="sdpa", layer_kernels=layer_kernels, dtype=dtype)
        out = token_losses(model, inputs, impl, backend)
        if out.dim():
            out = (out.float().reshape(-1) * inputs["loss_weight"].reshape(-1)).sum()
        out.float().backward()
        runs[name] = (float(out), {n: p.grad.float() for n, p in model.named_parameters()})
    ref_loss, ref_grads = runs.pop("fp32")
    return {
        name: {
            "loss": abs(loss - ref_loss) / abs(ref_loss),
            "grad": max(((grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items()),
        }
        for name, (loss, grads) in runs.items()
    }


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from megatron_hbp.data import load_sample_info, preprocess
    from megatron_hbp.data.testing import write_wordlevel_tokenizer
    from megatron_hbp.planner import GroupConfig, PlanConfig, build_plan

    work = tmp_path_factory.mktemp("layer_kernels")
    tok = write_wordlevel_tokenizer(
        work / "tok" / "tokenizer.json", WORDS + ["System", "User", "Assistant", ":"]
    )
    import random

    rng = random.Random(0)
    with open(work / "data.jsonl", "w") as f:
        for _ in range(40):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    preprocess(work / "data.jsonl", work / "info.npz", tokenizer=tok, template="plain", progress=False)
    info = load_sample_info(work / "info.npz")
    # Layer 0 of 2 fully recomputed: the Triton autograd functions also run under Megatron's checkpointing.
    group = GroupConfig(pack_length=128, recompute_layers=1)
    cfg = PlanConfig(groups=[group], world_size=1, micro_batches_per_step=2, seed=0)
    plan = build_plan(info.lengths, info.loss_tokens, cfg, fingerprint=info.fingerprint)
    assert plan.num_steps >= 2
    plan.save(work / "plan.npz")
    micro_batches = sum(int(plan.step(s).micro_batches_per_replica) for s in (0, 1))
    # The tiny preset's shapes with a 128-entry vocabulary (the interpreter's CE cost scales with V).
    (work / "model.yaml").write_text(
        "name: tiny128\nnum_layers: 2\nhidden_size: 64\nffn_hidden_size: 176\nnum_attention_heads: 4\n"
        "num_query_groups: 2\nvocab_size: 128\nmax_position_embeddings: 4096\nrope_theta: 10000.0\n"
        "norm_epsilon: 1.0e-5\ntie_embeddings: false\n"
    )
    proc = run_command([sys.executable, __file__, work], timeout=600, env={"TRITON_INTERPRET": "1"})
    assert "layer kernels triton" in proc.stdout and "layer kernels torch" in proc.stdout
    return work, json.loads((work / "result.json").read_text()), micro_batches


@pytest.mark.slow  # two trainer runs under the Triton interpreter (~17 s on 2 cores)
def test_triton_layers_match_torch_losses_and_grads(result):
    import torch

    work, res, _ = result
    assert len(res["torch"]["losses"]) == len(res["triton"]["losses"]) == 2
    for a, b in zip(res["triton"]["losses"], res["torch"]["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b)
    g_torch = torch.load(work / "grads_torch.pt")
    g_triton = torch.load(work / "grads_triton.pt")
    for step in (0, 1):
        assert g_torch[step].keys() == g_triton[step].keys() and len(g_torch[step]) >= 15
        for name, ref in g_torch[step].items():
            got = g_triton[step][name]
            err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-5, (step, name, err)


@pytest.mark.slow  # reads the same trainer runs
def test_bf16_model_within_twice_torch_bf16_error(result):
    """bf16 activations with the (fp32) norm weights of the local spec: the Triton layers and CE
    against the fp32 model are within 2x of the torch bf16 path's own error."""
    _, res, _ = result
    ours, torch_bf16 = res["bf16"]["triton_bf16"], res["bf16"]["torch_bf16"]
    assert 0 < torch_bf16["grad"] < 0.05
    assert ours["loss"] <= 2 * torch_bf16["loss"]
    assert ours["grad"] <= 2 * torch_bf16["grad"]


@pytest.mark.slow  # reads the same trainer runs
def test_every_triton_kernel_ran_only_on_the_triton_path(result):
    _, res, mbs = result
    assert all(v == 0 for v in res["torch"]["calls"].values()), res["torch"]["calls"]
    calls = res["triton"]["calls"]
    # Per micro-batch and layer: 2 norms, 1 SwiGLU, 1 q/k RoPE, forward and backward; + the final
    # norm; layer 0 is recomputed, so its forwards run twice.
    assert calls["rms_norm_fwd"] == mbs * (2 * (2 + 1) + 1)
    assert calls["rms_norm_bwd"] == mbs * (2 * 2 + 1)
    assert calls["swiglu_fwd"] == mbs * (2 + 1) and calls["swiglu_bwd"] == mbs * 2
    assert calls["rope_qk"] == mbs * (2 + 1) + mbs * 2  # forwards + backwards
    assert calls["_stats_triton_linear"] >= mbs and calls["_dlogits_triton_linear"] >= mbs


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


@pytest.mark.parametrize(
    "requested,on_cuda,te,interp,expected",
    [
        ("auto", True, True, False, "te"),
        ("auto", True, False, False, "triton"),
        ("auto", False, True, False, "torch"),
        ("auto", False, False, True, "torch"),
        ("triton", True, True, False, "triton"),
        ("triton", False, False, True, "triton"),
        ("torch", True, True, False, "torch"),
    ],
)
def test_layer_kernels_rule(requested, on_cuda, te, interp, expected):
    from megatron_hbp.mcore.model import resolve_layer_kernels

    assert resolve_layer_kernels(requested, on_cuda=on_cuda, te_available=te, interpreting=interp) == expected


def test_layer_kernels_bad_values():
    from megatron_hbp.mcore.config import ConfigError, DataConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.model import resolve_layer_kernels

    with pytest.raises(ValueError, match="needs CUDA .*TRITON_INTERPRET=1"):
        resolve_layer_kernels("triton", on_cuda=False, te_available=False, interpreting=False)
    with pytest.raises(ValueError, match="layer_kernels 'te' unknown"):
        resolve_layer_kernels("te", on_cuda=True, te_available=True, interpreting=False)
    with pytest.raises(ConfigError, match="layer_kernels 'fast': use auto, triton or torch"):
        TrainConfig(
            model="tiny",
            data=DataConfig(sample_info="x.npz"),
            plan=PlanSource(path="p.npz"),
            layer_kernels="fast",
        )
