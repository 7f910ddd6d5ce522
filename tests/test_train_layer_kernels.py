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
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "packing",
    "long",
    "sequences",
    "into",
    "balanced",
    "batches",
]


def _worker(work: Path) -> None:
    import torch

    from megatron_hbp.kernels import cross_entropy as ce
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
    (work / "result.json").write_text(json.dumps(results))


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
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, __file__, str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "layer kernels triton" in proc.stdout and "layer kernels torch" in proc.stdout
    return work, json.loads((work / "result.json").read_text()), micro_batches


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
