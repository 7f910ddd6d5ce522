"""HF <-> Megatron conversion without megatron or transformers: layout by hand, bit-exact
round trips (TP 1 and 2, sharded, bf16 and fp32), config.json parsing, and every bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_hbp.convert import (
    CheckpointMismatchError,
    UnsupportedModelError,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
    resolve_model_config,
)
from megatron_hbp.convert.hf_config import config_differences
from megatron_hbp.convert.mapping import check_tp, padded_vocab_size, tensor_maps, to_hf, to_megatron
from megatron_hbp.convert.safetensors_io import StreamingSafetensorsWriter
from megatron_hbp.model_config import ModelConfig, load_model_config

# ---------------------------------------------------------------- small HF checkpoints, written by hand

LLAMA = {  # GQA, untied, Llama-3 RoPE scaling, transformers-4 layout
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 250,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
QWEN2 = {  # q/k/v biases, tied, transformers-5 layout
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "hidden_act": "silu",
    "dtype": "float32",
}


def hf_tensors(cfg: dict, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the real HF names and shapes (written independently of the converter)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, ng = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // nh
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nh * d, h),
                p + "self_attn.k_proj.weight": (ng * d, h),
                p + "self_attn.v_proj.weight": (ng * d, h),
                p + "self_attn.o_proj.weight": (h, nh * d),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if cfg["model_type"] == "qwen2":
            shapes.update(
                {p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (ng * d,)}
                | {p + "self_attn.v_proj.bias": (ng * d,)}
            )
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}


def write_hf(path: Path, cfg: dict, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """config.json + ``shards`` safetensors files + index (safetensors' own writer)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return path


def read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---------------------------------------------------------------- layout, by hand


def _cfg(**kw) -> ModelConfig:
    base = dict(
        num_layers=1,
        hidden_size=4,
        ffn_hidden_size=4,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=5,
    )
    return ModelConfig(**(base | kw))


def test_fused_qkv_is_megatron_group_interleaved_and_tp_chunks_whole_groups():
    cfg = _cfg(hidden_size=4, kv_channels=1)  # d = 1: one row per head
    tm = next(t for t in tensor_maps(cfg) if t.kind == "qkv")
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # heads q0..q3; group 0 = q0,q1
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    (full,) = to_megatron(tm, [q, k, v], cfg, 1, 8)
    assert full.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    r0, r1 = to_megatron(tm, [q, k, v], cfg, 2, 8)
    assert r0.flatten().tolist() == [0, 1, 10, 20] and r1.flatten().tolist() == [2, 3, 11, 21]
    back = to_hf(tm, [r0, r1], cfg)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_fc1_shards_gate_and_up_separately():
    cfg = _cfg()
    tm = next(t for t in tensor_maps(cfg) if t.kind == "fc1")
    gate = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    up = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    r0, r1 = to_megatron(tm, [gate, up], cfg, 2, 8)
    assert r0.flatten().tolist() == [0, 1, 10, 11] and r1.flatten().tolist() == [2, 3, 12, 13]
    g2, u2 = to_hf(tm, [r0, r1], cfg)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_padding_and_row_parallel():
    assert padded_vocab_size(5, 2, 2) == 8 and padded_vocab_size(128256, 8) == 129024
    assert (
        padded_vocab_size(152064, 4) == 152064
        and padded_vocab_size(152064, 8) == 152576
        and padded_vocab_size(32000, 1) == 32000
    )
    cfg = _cfg()
    emb = next(t for t in tensor_maps(cfg) if t.kind == "vocab")
    w = torch.arange(5.0)[:, None].repeat(1, 4)
    r0, r1 = to_megatron(emb, [w], cfg, 2, 8)
    assert r0[:, 0].tolist() == [0, 1, 2, 3] and r1[:, 0].tolist() == [4, 0, 0, 0]
    assert torch.equal(to_hf(emb, [r0, r1], cfg)[0], w)
    proj = next(t for t in tensor_maps(cfg) if t.megatron.endswith("linear_proj.weight"))
    o = torch.arange(16.0).reshape(4, 4)
    r0, r1 = to_megatron(proj, [o], cfg, 2, 8)  # row-parallel: split the input (column) dim
    assert r0.tolist() == [[0, 1], [4, 5], [8, 9], [12, 13]]


def test_megatron_names_of_a_tied_qwen2_layer():
    names = [t.megatron for t in tensor_maps(_cfg(add_qkv_bias=True, tie_embeddings=True))]
    assert names == [
        "embedding.word_embeddings.weight",
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.final_layernorm.weight",
    ]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_bit_exact(tmp_path, arch, tp):
    cfg, dtype = (LLAMA, torch.bfloat16) if arch == "llama" else (QWEN2, torch.float32)
    src = hf_tensors(cfg, dtype, seed=tp)
    hf = write_hf(tmp_path / "hf", cfg, src, shards=3)
    meta = hf_to_megatron(hf, tmp_path / "mg", tp=tp, progress=False)
    assert meta["tp"] == tp and meta["vocab_size"] == cfg["vocab_size"]
    assert meta["padded_vocab_size"] == 128 * tp * -(-cfg["vocab_size"] // (128 * tp))
    for r in range(tp):  # rank files: Megatron shapes and the source dtype
        with safe_open(str(tmp_path / "mg" / f"model_tp{r:02d}.safetensors"), "pt") as f:
            emb = f.get_tensor("embedding.word_embeddings.weight")
            assert emb.shape == (meta["padded_vocab_size"] // tp, 32) and emb.dtype == dtype
            keys = set(f.keys())
            assert ("output_layer.weight" in keys) == (arch == "llama")
            assert ("decoder.layers.1.self_attention.linear_qkv.bias" in keys) == (arch == "qwen2")
    files = megatron_to_hf(tmp_path / "mg", tmp_path / "out", max_shard_size=20_000, progress=False)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = read_hf_dir(tmp_path / "out")
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype, name
        assert torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name  # bit for bit
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    assert all((tmp_path / "out" / f).is_file() for f in index["weight_map"].values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == cfg["vocab_size"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'


def test_export_single_file_and_dtype_cast(tmp_path):
    src = hf_tensors(QWEN2, torch.float32)
    hf_to_megatron(write_hf(tmp_path / "hf", QWEN2, src), tmp_path / "mg", tp=2, progress=False)
    megatron_to_hf(tmp_path / "mg", tmp_path / "out", dtype=torch.bfloat16, progress=False)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    back = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(back[n], t.to(torch.bfloat16)) for n, t in src.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------- config.json


# Meta-Llama-3.1-8B and Qwen2.5-7B config.json (the keys that matter), as published.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}


@pytest.mark.parametrize("hf,preset", [(LLAMA31_8B, "llama3_1_8b"), (QWEN25_7B, "qwen2_5_7b")])
def test_config_json_matches_the_presets(tmp_path, hf, preset):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = model_config_from_hf(tmp_path)
    assert config_differences(cfg, load_model_config(preset)) == []
    assert cfg.head_dim == 128 and cfg.num_query_groups == hf["num_key_value_heads"]


def test_config_json_transformers5_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2))
    cfg = model_config_from_hf(tmp_path / "config.json")
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.tie_embeddings, cfg.add_qkv_bias) == (1e6, None, True, True)
    assert cfg.norm_epsilon == 1e-6 and cfg.vocab_size == 300
    llama5 = {k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    llama5["rope_parameters"] = {**LLAMA["rope_scaling"], "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(llama5))
    cfg = model_config_from_hf(tmp_path)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position_embeddings == 64


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["MistralForCausalLM"]}, "architecture 'MistralForCausalLM' is not supported"),
        ({"architectures": [], "model_type": "gemma"}, "model_type 'gemma' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ],
)
def test_unsupported_models_are_refused(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA | change))
    with pytest.raises(UnsupportedModelError, match=message):
        model_config_from_hf(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    src = hf_tensors(LLAMA, torch.float32)
    src["model.layers.1.mlp.up_proj.weight"] = torch.zeros(47, 32)
    hf = write_hf(tmp_path / "hf", LLAMA, src)
    with pytest.raises(
        CheckpointMismatchError, match=r"model.layers.1.mlp.up_proj.weight .* \[47, 32\], expected \[48, 32\]"
    ):
        hf_to_megatron(hf, tmp_path / "mg", progress=False)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    src = hf_tensors(LLAMA, torch.float32)
    del src["lm_head.weight"]
    src["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    hf = write_hf(tmp_path / "hf", LLAMA, src)
    with pytest.raises(CheckpointMismatchError) as e:
        hf_to_megatron(hf, tmp_path / "mg", progress=False)
    assert "missing tensor lm_head.weight" in str(e.value)
    assert "unexpected tensor model.layers.0.self_attn.o_proj.bias" in str(e.value)


def test_tp_must_divide_heads_and_kv_heads(tmp_path):
    hf = write_hf(tmp_path / "hf", LLAMA, hf_tensors(LLAMA, torch.float32))
    with pytest.raises(ValueError, match=r"TP=4 does not divide num_query_groups \(kv heads\)=2.*\[1, 2\]"):
        hf_to_megatron(hf, tmp_path / "mg", tp=4, progress=False)
    with pytest.raises(ValueError, match="TP=3 does not divide num_attention_heads=4"):
        check_tp(model_config_from_hf(hf), 3)
    assert not (tmp_path / "mg").exists()  # refused before writing anything


def test_missing_shard_is_named(tmp_path):
    hf = write_hf(tmp_path / "hf", LLAMA, hf_tensors(LLAMA, torch.float32), shards=3)
    (hf / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"names 1 shard file\(s\) that do not exist.*model-00002-of-00003"
    ):
        hf_to_megatron(hf, tmp_path / "mg", progress=False)


def test_preset_must_agree_with_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    assert resolve_model_config(tmp_path, "llama3_1_8b").hidden_size == 4096
    with pytest.raises(ValueError, match=r"'qwen2_5_7b' disagrees .*num_layers: 28 != 32"):
        resolve_model_config(tmp_path, "qwen2_5_7b")
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="pass --model-preset"):
        resolve_model_config(tmp_path)


def test_streaming_writer_checks_order_and_completeness(tmp_path):
    specs = [("a", torch.bfloat16, (2, 3)), ("b", torch.int64, (4,))]
    a, b = torch.randn(2, 3).to(torch.bfloat16), torch.arange(4)
    with StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
        w.write("a", a)
        w.write("b", b)
    got = load_file(tmp_path / "x.safetensors")
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)
    bad_order = pytest.raises(ValueError, match=r"expected tensor a torch.bfloat16 \[2, 3\], got b")
    with bad_order, StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs) as w:
        w.write("b", b)
    with (
        pytest.raises(ValueError, match="1 tensors never written"),
        StreamingSafetensorsWriter(tmp_path / "z.safetensors", specs) as w,
    ):
        w.write("a", a)
    assert not (tmp_path / "y.safetensors").exists() and not (tmp_path / "z.safetensors").exists()


# ---------------------------------------------------------------- streaming: peak memory


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from megatron_hbp.convert import hf_to_megatron, megatron_to_hf
    tmp = Path(sys.argv[1])

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    def reset_peak():  # Linux >= 4.0: "5" resets VmHWM (the peak RSS) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status("VmRSS")

    base = reset_peak()
    hf_to_megatron(tmp / "hf", tmp / "mg", tp=2, progress=False)
    imp = status("VmHWM") - base
    base = reset_peak()
    megatron_to_hf(tmp / "mg", tmp / "out", max_shard_size=64 * 2**20, progress=False)
    print(json.dumps({"import_mb": imp, "export_mb": status("VmHWM") - base}))
    """
)


@pytest.mark.slow
def test_peak_memory_stays_near_the_largest_tensor(tmp_path):
    """A ~200 MB model converts both ways with peak RSS growth of a few largest tensors."""
    cfg = LLAMA | {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 16000,
    }
    src = hf_tensors(cfg, torch.float32)
    model_mb = sum(t.numel() * 4 for t in src.values()) / 2**20
    largest_mb = max(t.numel() * 4 for t in src.values()) / 2**20
    write_hf(tmp_path / "hf", cfg, src, shards=4)
    del src
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grow = max(r["import_mb"], r["export_mb"])
    print(f"model {model_mb:.0f} MB, largest tensor {largest_mb:.1f} MB, peak RSS growth {r}")
    assert model_mb > 150
    assert grow < 4 * largest_mb + 40, (grow, largest_mb, model_mb)


# ---------------------------------------------------------------- training checkpoints and the CLI


def _training_checkpoint(
    tmp_path: Path, src_cfg: dict, dtype: torch.dtype, tp: int, **meta_extra
) -> dict[str, torch.Tensor]:
    """A checkpoint in the trainer's layout (megatron_hbp.mcore.checkpoint), written through the
    same atomic path: step_<N>/rank_<R>.pt with a 'model' state dict, meta.json with the model
    config, manifest.json with sizes and checksums, and 'latest'."""
    from megatron_hbp.checkpoint_files import begin_step, commit_step, file_entry

    src = hf_tensors(src_cfg, dtype, seed=5)
    meta = hf_to_megatron(write_hf(tmp_path / "hf", src_cfg, src), tmp_path / "mg", tp=tp, progress=False)
    step = begin_step(tmp_path / "ckpt", 6)
    for r in range(tp):
        model = load_file(tmp_path / "mg" / f"model_tp{r:02d}.safetensors")
        model["decoder.layers.0.self_attention.linear_proj._extra_state"] = None  # like Megatron's
        torch.save(
            {"steps_done": 6, "model": model, "optimizer": {"state": {}}, "rng": {}},
            step / f"rank_{r:05d}.pt",
        )
    for r in range(tp, 2 * tp):  # data-parallel replicas: not read
        (step / f"rank_{r:05d}.pt").write_bytes(b"not read")
    (step / "meta.json").write_text(
        json.dumps({"model": meta["model_config"], "tp": tp, "pp": 1, "steps_done": 6} | meta_extra)
    )
    files = {f.name: file_entry(f) for f in step.iterdir()}
    commit_step(tmp_path / "ckpt", 6, files, {})
    assert (tmp_path / "ckpt" / "latest").read_text() == "step_6\n"
    return src


def test_training_checkpoint_exports_bit_exact_with_a_sentencepiece_tokenizer(tmp_path):
    src = _training_checkpoint(tmp_path, LLAMA, torch.float32, tp=2)
    from megatron_hbp.data import default_tokenizer_path

    megatron_to_hf(tmp_path / "ckpt", tmp_path / "out", tokenizer=default_tokenizer_path(), progress=False)
    back = read_hf_dir(tmp_path / "out")
    assert sorted(back) == sorted(src) and all(torch.equal(back[n], t) for n, t in src.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["rope_scaling"]["rope_type"] == "llama3"
    assert (
        config_differences(model_config_from_hf(tmp_path / "out"), model_config_from_hf(tmp_path / "hf"))
        == []
    )
    tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (tok["bos_token"], tok["eos_token"]) == ("<s>", "</s>")  # mistral v1 SentencePiece ids 1, 2
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == default_tokenizer_path().read_bytes()


def test_training_checkpoint_errors(tmp_path):
    _training_checkpoint(tmp_path, QWEN2, torch.float32, tp=2)
    step = tmp_path / "ckpt" / "step_6"
    (tmp_path / "LLAMA").mkdir()
    (tmp_path / "LLAMA" / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(ValueError, match=r"does not describe the checkpoint's model: .*tie_embeddings"):
        megatron_to_hf(step, tmp_path / "out", hf_config=tmp_path / "LLAMA", progress=False)
    (step / "rank_00001.pt").unlink()
    with pytest.raises(ValueError, match=r"step_6/rank_00001.pt: missing \(listed in manifest.json\)"):
        megatron_to_hf(step, tmp_path / "out", progress=False)
    _training_checkpoint(tmp_path / "pp2", QWEN2, torch.float32, tp=2, pp=2)
    with pytest.raises(ValueError, match="pipeline parallel size 1 only"):
        megatron_to_hf(tmp_path / "pp2" / "ckpt", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="neither convert_meta.json"):
        megatron_to_hf(tmp_path, tmp_path / "out", progress=False)


def test_cli(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import convert_checkpoint as cli
    finally:
        sys.path.pop(0)
    src = hf_tensors(QWEN2, torch.bfloat16)
    hf = write_hf(tmp_path / "hf", QWEN2, src)
    assert (
        cli.main(
            [
                "hf-to-megatron",
                "--hf",
                str(hf),
                "--tp",
                "2",
                "--output",
                str(tmp_path / "mg"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "vocab 300 padded to 512" in capsys.readouterr().out
    argv = ["megatron-to-hf", "--checkpoint", str(tmp_path / "mg"), "--output", str(tmp_path / "out")]
    assert cli.main([*argv, "--max-shard-size", "20KB", "--no-progress"]) == 0
    back = read_hf_dir(tmp_path / "out")
    assert all(torch.equal(back[n], t) for n, t in src.items())
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    bad = ["hf-to-megatron", "--hf", str(hf), "--tp", "4", "--output", str(tmp_path / "x"), "--no-progress"]
    assert cli.main(bad) == 2
    assert "TP=4 does not divide" in capsys.readouterr().err
    assert cli._size("5GB") == 5 * 10**9 and cli._size("2MiB") == 2 * 2**20 and cli._size("1000") == 1000


# ---------------------------------------------------------------- loading into a model (no megatron needed)


def _module_with(shapes: dict[str, tuple[int, ...]]) -> torch.nn.Module:
    """An nn.Module whose parameters have exactly these dotted names (a stand-in for GPTModel)."""
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(torch.full(shape, float("nan"))))
    return root


def test_load_pretrained_into_model_picks_the_rank_and_checks_the_model(tmp_path):
    from megatron_hbp.convert import load_pretrained_into_model
    from megatron_hbp.convert.mapping import megatron_shape

    src = hf_tensors(LLAMA, torch.float32)
    hf = write_hf(tmp_path / "hf", LLAMA, src)
    hf_to_megatron(hf, tmp_path / "mg", tp=2, progress=False)
    cfg = model_config_from_hf(hf)
    shapes = {tm.megatron: megatron_shape(tm, cfg, 2, 256) for tm in tensor_maps(cfg)}
    rank1 = load_file(tmp_path / "mg" / "model_tp01.safetensors")
    for path in (hf, tmp_path / "mg"):  # on the fly from HF, and from the converted files
        model = _module_with(shapes)
        load_pretrained_into_model(model, path, model_cfg=cfg, tp_rank=1, tp_size=2)
        for name, p in model.named_parameters():
            assert torch.equal(p, rank1[name]), name
    # by hand: rank 1 of the untied output layer = rows 128..255 of lm_head, zero from row 250
    out = dict(model.named_parameters())["output_layer.weight"]
    assert torch.equal(out[:122], src["lm_head.weight"][128:]) and not out[122:].any()

    with pytest.raises(ValueError, match="converted for tp=2 but the model runs with tp=1"):
        load_pretrained_into_model(_module_with(shapes), tmp_path / "mg", model_cfg=cfg, tp_size=1)
    other = dataclasses.replace(cfg, num_layers=3)
    with pytest.raises(ValueError, match="num_layers: 3 != 2"):
        load_pretrained_into_model(_module_with(shapes), hf, model_cfg=other, tp_size=2)
    del shapes["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(
        CheckpointMismatchError, match=r"not in the model \['decoder.layers.1.mlp.linear_fc2.weight'\]"
    ):
        load_pretrained_into_model(_module_with(shapes), hf, model_cfg=cfg, tp_rank=0, tp_size=2)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model directory"):
        load_pretrained_into_model(_module_with(shapes), tmp_path, model_cfg=cfg)


def test_find_hf_tokenizer(tmp_path):
    from megatron_hbp.convert import find_hf_tokenizer

    assert find_hf_tokenizer(tmp_path) == (None, None)
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert find_hf_tokenizer(tmp_path) == (tmp_path / "tokenizer.model", "{{ messages }}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{% endfor %}")
    assert find_hf_tokenizer(tmp_path) == (tmp_path / "tokenizer.json", "{% for m in messages %}{% endfor %}")


def test_export_without_tokenizer_warns(tmp_path, caplog, capsys):
    # A training checkpoint carries no tokenizer: the export says so (API: a log warning; CLI: a line).
    _training_checkpoint(tmp_path, LLAMA, torch.float32, tp=1)
    with caplog.at_level("WARNING", logger="megatron_hbp.convert"):
        megatron_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert any("has no tokenizer" in r.getMessage() for r in caplog.records)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    try:
        import convert_checkpoint as cli
    finally:
        sys.path.pop(0)
    assert (
        cli.main(
            [
                "megatron-to-hf",
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--output",
                str(tmp_path / "o2"),
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "warning: " in err and "has no tokenizer" in err and "--tokenizer PATH" in err
    from megatron_hbp.data import default_tokenizer_path

    args = [
        "megatron-to-hf",
        "--checkpoint",
        str(tmp_path / "ckpt"),
        "--output",
        str(tmp_path / "o3"),
        "--no-progress",
    ]
    assert cli.main(args + ["--tokenizer", str(default_tokenizer_path())]) == 0
    assert "has no tokenizer" not in capsys.readouterr().err
