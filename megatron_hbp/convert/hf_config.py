"""Hugging Face ``config.json`` <-> :class:`~megatron_hbp.model_config.ModelConfig`.

Pure Python (json only). The reader (:func:`model_config_from_hf`: LLaMA / Qwen2, both
transformers layouts, anything the Megatron model cannot reproduce refused with the key named)
lives in ``megatron_hbp.model_config``, since loading a model config accepts a HF folder; this
module re-exports it beside the writer (:func:`hf_config_from_model_config`) and
:func:`config_differences`.
"""

from __future__ import annotations

from typing import Any

# Reading a config.json is part of loading a model config (``load_model_config`` accepts a HF
# folder), so the reader lives one layer down, in megatron_hbp.model_config, and is re-exported
# here with the writer: megatron_hbp.model_config never imports megatron_hbp.convert.
from megatron_hbp.model_config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    UnsupportedModelError,
    hf_model_type,
    model_config_from_hf,
    read_hf_config,
)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "UnsupportedModelError",
    "config_differences",
    "hf_config_from_model_config",
    "hf_model_type",
    "model_config_from_hf",
    "read_hf_config",
]


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
