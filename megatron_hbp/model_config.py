"""LLaMA-architecture model shapes, as named presets (``megatron_hbp/presets/*.yaml``).

Pure Python: shared by the training adapter (``megatron_hbp.mcore``), the cost model and
the checkpoint converter, so a shape is written down once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_hbp.configio import ConfigError, load_yaml

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
    ``megatron_hbp.convert.model_config_from_hf``), or a folder written by
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
    # Imported here: megatron_hbp.convert imports torch (its package __init__ loads the
    # tensor code), and this module must stay importable without torch.
    from megatron_hbp.convert.hf_config import model_config_from_hf

    try:
        return model_config_from_hf(path)
    except (ValueError, FileNotFoundError) as e:  # UnsupportedModelError is a ValueError
        raise ConfigError(str(e)) from None


def _converted_model_config(meta_path: Path) -> ModelConfig:
    import json

    from megatron_hbp.configio import from_dict

    try:
        meta = json.loads(meta_path.read_text())
        return from_dict(ModelConfig, meta["model_config"], str(meta_path))
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{meta_path}: not a readable convert_meta.json ({e})") from None
