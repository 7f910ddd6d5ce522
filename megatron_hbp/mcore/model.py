"""The one model builder: a ``ModelConfig`` (LLaMA shapes) -> Megatron-Core ``GPTModel``.

RMSNorm, SwiGLU (gated linear unit + SiLU), no linear biases (optional q/k/v bias for
Qwen2), grouped-query attention, tied or untied embeddings, RoPE with base and Llama-3
scaling applied inside our packed ``core_attention`` (see ``attention.py`` for why). Moving
to ``HybridModel`` later only touches this file.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hbp.mcore.attention import PackedCoreAttention, RopeSpec
from megatron_hbp.model_config import ModelConfig


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocabulary padded so every TP rank holds the same number of rows (Megatron-LM rule)."""
    m = multiple * tp
    return ((vocab_size + m - 1) // m) * m


def rope_spec(model_cfg: ModelConfig) -> RopeSpec:
    rs = model_cfg.rope_scaling
    if rs is None:
        return RopeSpec(theta=model_cfg.rope_theta)
    return RopeSpec(
        theta=model_cfg.rope_theta,
        scaling_factor=rs.factor,
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_max_position_embeddings,
    )


def transformer_config(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool | None = None,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``model_cfg``; per-token loss (stable loss) on.

    Context parallelism is ours (``context_parallel_size`` stays 1): Megatron sees every
    data x context rank as data parallel, which is exactly how HBP reduces gradients.
    """
    if model_cfg.num_attention_heads % tp or model_cfg.num_query_groups % tp:
        raise ValueError(
            f"model '{model_cfg.name}': attention heads ({model_cfg.num_attention_heads}) and query groups "
            f"({model_cfg.num_query_groups}) must be divisible by tensor parallel size {tp}; lower tp"
        )
    if model_cfg.num_layers % pp:
        raise ValueError(
            f"model '{model_cfg.name}': num_layers {model_cfg.num_layers} not divisible by pp {pp}"
        )
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model_cfg.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # no MoE; the default "allgather" rejects variable lengths
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def build_layer_spec(model_cfg: ModelConfig, attention_backend: str = "auto"):
    """Megatron local layer spec with our packed core attention in the ``core_attention`` slot."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        PackedCoreAttention, rope=rope_spec(model_cfg), backend=attention_backend
    )
    return spec


def build_model(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    attention_backend: str = "auto",
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
) -> GPTModel:
    """Build the (TP/PP-local part of the) model on this rank. Needs Megatron's parallel state
    (``parallel_state.initialize_model_parallel``) and an RNG tracker seeded
    (``model_parallel_cuda_manual_seed``)."""
    config = transformer_config(model_cfg, tp=tp, pp=pp, dtype=dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(model_cfg, attention_backend),
        vocab_size=padded_vocab_size(model_cfg.vocab_size, tp),
        max_sequence_length=model_cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="none",  # RoPE lives in PackedCoreAttention
        parallel_output=True,
        pg_collection=pg_collection,
    )
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def set_recompute(model, num_layers: int) -> None:
    """Full recompute of the first ``num_layers`` transformer layers of each stage (``block``).

    Megatron's ``TransformerBlock`` reads these config fields at every forward, and every
    layer shares one config object, so changing them between steps is safe.
    """
    config = _unwrap(model).config
    if num_layers > 0:
        config.recompute_granularity = "full"
        config.recompute_method = "block"
        config.recompute_num_layers = int(num_layers)
    else:
        config.recompute_granularity = None
        config.recompute_method = None
        config.recompute_num_layers = None


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model
