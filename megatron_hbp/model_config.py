"""LLaMA-architecture model shapes, as named presets (``megatron_hbp/presets/*.yaml``).

Pure Python: shared by the training adapter (``megatron_hbp.mcore``), the cost model and
the checkpoint converter, so a shape is written down once. :func:`load_model_config` reads a
preset, a YAML file, a converted folder or a Hugging Face ``config.json``
(:func:`model_config_from_hf`: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``, the
transformers-4 and -5 RoPE layouts; anything the Megatron model cannot reproduce exactly --
other RoPE types, sliding windows, biases on o_proj/MLP, non-SiLU activations -- is refused
with a message that names the key). The writer of HF configs is ``megatron_hbp.convert``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_hbp.configio import ConfigError, from_dict, load_yaml

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_scaling`` with ``rope_type: llama3`` in HF)."""

    factor: float = 8.0
    """Scale applied to low frequencies."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length of pre-training before the extension."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a LLaMA-architecture decoder (RMSNorm, SwiGLU, RoPE, GQA)."""

    name: str = "custom"
    """Preset name (informational)."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU intermediate size (per branch)."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups); equal to num_attention_heads for MHA."""
    kv_channels: int | None = None
    """Head dimension; defaults to hidden_size // num_attention_heads."""
    vocab_size: int
    """Tokenizer vocabulary (before padding for tensor parallelism)."""
    max_position_embeddings: int = 131072
    """Largest sequence length RoPE is prepared for."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScaling | None = None
    """Llama-3 RoPE scaling, or None."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share input embedding and output layer weights."""
    add_qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    init_method_std: float = 0.02
    """Std of the normal init for random weights."""
    extra: dict = field(default_factory=dict)
    """Free-form notes (e.g. the source of the shapes); not used by the model."""

    def __post_init__(self):
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model '{self.name}': {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model '{self.name}': num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model '{self.name}': hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set kv_channels explicitly"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Exact parameter count (unpadded vocabulary)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_query_groups * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.add_qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset by name (``tiny``, ``llama3_1_8b``, ...), a YAML file with ModelConfig keys, a
    Hugging Face model folder or its ``config.json`` (LLaMA / Qwen2, via
    :func:`model_config_from_hf`), or a folder written by
    ``tools/convert_checkpoint.py hf-to-megatron`` (its ``convert_meta.json``).

    The same argument always gives the same config (the trainer compares it on resume).
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml(ModelConfig, path)
    if path.is_dir():
        if (path / "convert_meta.json").is_file():
            return _converted_model_config(path / "convert_meta.json")
        if (path / "config.json").is_file():
            return _hf_model_config(path)
        raise ConfigError(
            f"model folder {path} has neither config.json (a Hugging Face model) nor convert_meta.json "
            "(tools/convert_checkpoint.py hf-to-megatron output); give a preset name, a model YAML, "
            "or a folder with one of these files"
        )
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        if path.name == "convert_meta.json":
            return _converted_model_config(path)
        return _hf_model_config(path)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown model preset '{name_or_path}'. Available: {', '.join(available_presets())}; "
            "or give the path of a YAML file with ModelConfig keys, or a Hugging Face model folder"
        )
    return load_yaml(ModelConfig, preset)


def _hf_model_config(path: Path) -> ModelConfig:
    try:
        return model_config_from_hf(path)
    except (ValueError, FileNotFoundError) as e:  # UnsupportedModelError is a ValueError
        raise ConfigError(str(e)) from None


def _converted_model_config(meta_path: Path) -> ModelConfig:
    try:
        meta = json.loads(meta_path.read_text())
        return from_dict(ModelConfig, meta["model_config"], str(meta_path))
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{meta_path}: not a readable convert_meta.json ({e})") from None


# ----------------------------------------------------------------------------- Hugging Face config.json


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
