"""Hugging Face <-> Megatron-Core checkpoint conversion (LLaMA, Qwen2), tensor by tensor.

Imports torch and safetensors only (no megatron): the mapping is testable without building
a model; loading into a model only needs a built ``torch.nn.Module`` with Megatron-Core's
local-spec parameter names (``megatron_hbp.mcore.build_model``).
"""

from megatron_hbp.convert.checkpoint import (
    CheckpointMismatchError,
    TensorSource,
    export_hf,
    find_hf_tokenizer,
    hf_to_megatron,
    load_converted_into_model,
    load_hf_into_model,
    load_pretrained_into_model,
    megatron_to_hf,
    read_meta,
    resolve_model_config,
)
from megatron_hbp.convert.hf_config import (
    UnsupportedModelError,
    hf_config_from_model_config,
    model_config_from_hf,
)
from megatron_hbp.convert.mapping import check_tp, padded_vocab_size, tensor_maps

__all__ = [
    "CheckpointMismatchError",
    "TensorSource",
    "UnsupportedModelError",
    "check_tp",
    "export_hf",
    "find_hf_tokenizer",
    "hf_config_from_model_config",
    "hf_to_megatron",
    "load_converted_into_model",
    "load_hf_into_model",
    "load_pretrained_into_model",
    "megatron_to_hf",
    "model_config_from_hf",
    "padded_vocab_size",
    "read_meta",
    "resolve_model_config",
    "tensor_maps",
]
