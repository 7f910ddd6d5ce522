"""Hugging Face ``config.json`` <-> :class:`~megatron_hbp.model_config.ModelConfig`.

Pure Python (json only). Supports the two architectures the paper fine-tunes:
``LlamaForCausalLM`` (LLaMA 2/3/3.1, optional Llama-3 RoPE scaling) and
``Qwen2ForCausalLM`` (Qwen2/2.5: biases on q/k/v). Both the transformers-4 layout
(``rope_theta`` + ``rope_scaling`` at the top level) and the transformers-5 layout
(``rope_parameters``) are read; anything the Megatron model cannot reproduce exactly
(other RoPE types, sliding windows, biases on o_proj/MLP, non-SiLU activations) is refused
with a message that names the key, rather than silently producing a different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_hbp.model_config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
"""HF ``architectures[0]`` -> ``model_type``."""


class UnsupportedModelError(ValueError):
    """The Hugging Face model uses a feature the Megatron model does not implement."""


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a HF directory (or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no config.json. A Hugging Face model directory holds config.json next to its "
            "*.safetensors files; otherwise pass --model-preset NAME"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def hf_model_type(cfg: dict[str, Any], where: str = "config.json") -> str:
    """``'llama'`` or ``'qwen2'``; raises :class:`UnsupportedModelError` for anything else."""
    archs = cfg.get("architectures") or []
    if archs:
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{where}: architecture '{arch}' is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        return SUPPORTED_ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' is not supported (no 'architectures' key either); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return model_type


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x writes
    # rope_theta + rope_scaling ({"rope_type"|"type": ..., ...} or null).
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"{where}: RoPE scaling type '{rope_type}' is not supported (only the default RoPE and "
            "Llama-3 scaling 'llama3' are implemented)"
        )
    missing = [
        k
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if k not in scaling
    ]
    if missing:
        raise ValueError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def model_config_from_hf(config_json_path: str | Path, name: str | None = None) -> ModelConfig:
    """Model shapes from a HF ``config.json`` (path of the file or of its directory).

    Reads layers, widths, heads, kv heads, head_dim, vocab size, rope theta and Llama-3
    rope scaling, RMSNorm eps, the tie flag and (Qwen2) the q/k/v biases.
    Raises :class:`UnsupportedModelError` naming the offending key otherwise.
    """
    path = Path(config_json_path)
    cfg = read_hf_config(path)
    where = str(path / "config.json" if path.is_dir() else path)
    model_type = hf_model_type(cfg, where)

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act '{act}' is not supported (SwiGLU needs 'silu')")
    if model_type == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise UnsupportedModelError(
                    f"{where}: {key}=true is not supported (the Megatron model has no biases on "
                    "o_proj/MLP; only Qwen2-style q/k/v biases)"
                )
        add_qkv_bias = False
    else:
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError(f"{where}: use_sliding_window=true is not supported")
        add_qkv_bias = True
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise UnsupportedModelError(f"{where}: pretraining_tp={cfg['pretraining_tp']} is not supported")

    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        theta, scaling = _rope(cfg, where)
        head_dim = cfg.get("head_dim")
        kv_channels = int(head_dim) if head_dim and int(head_dim) != hidden // heads else None
        if kv_channels is None and hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        return ModelConfig(
            name=name or (path.name if path.is_dir() else path.parent.name) or f"hf-{model_type}",
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(cfg.get("num_key_value_heads") or heads),
            kv_channels=kv_channels,
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            add_qkv_bias=add_qkv_bias,
            init_method_std=float(cfg.get("initializer_range", 0.02)),
            extra={"hf_model_type": model_type},
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from e


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """A ``config.json`` dict for ``cfg`` (Qwen2 when it has q/k/v biases, else LLaMA).

    Written in the transformers-4 layout (``rope_theta``/``rope_scaling``), which
    transformers 5 also reads.
    """
    qwen = cfg.add_qkv_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_method_std,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        }
    if qwen:
        out["use_sliding_window"] = False
    else:
        out["attention_bias"] = False
        out["mlp_bias"] = False
    return out


# Fields that decide the tensor shapes and the math; name/init/extra/max positions do not.
_MODEL_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
    "vocab_size",
    "rope_theta",
    "rope_scaling",
    "norm_epsilon",
    "tie_embeddings",
    "add_qkv_bias",
)


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``['field: a_value != b_value', ...]`` over the fields that change weights or outputs."""
    return [
        f"{k}: {getattr(a, k)!r} != {getattr(b, k)!r}"
        for k in _MODEL_FIELDS
        if getattr(a, k) != getattr(b, k)
    ]
