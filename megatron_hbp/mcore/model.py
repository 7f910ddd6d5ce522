"""The one model builder: a ``ModelConfig`` (LLaMA shapes) -> Megatron-Core ``GPTModel``.

RMSNorm, SwiGLU (gated linear unit + SiLU), no linear biases (optional q/k/v bias for
Qwen2), grouped-query attention, tied or untied embeddings, RoPE with base and Llama-3
scaling applied inside our packed ``core_attention`` (see ``attention.py`` for why). Moving
to ``HybridModel`` later only touches this file.

Layer kernels (``layer_kernels``, resolved by :func:`select_layer_kernels`), wired through
Megatron's ``ModuleSpec`` of the local layer (no monkey-patching):

* ``"torch"``: Megatron's local spec as is (``torch.nn.RMSNorm``, unfused GLU in
  ``MLP.forward``, unfused fp32 RoPE),
* ``"triton"``: ``megatron_hbp.kernels`` in the same slots: :class:`TritonRMSNorm` as
  ``input_layernorm`` / ``pre_mlp_layernorm`` / the block's final norm, :class:`TritonSwiGLU` as
  the MLP's ``activation_func`` submodule (``TransformerConfig.use_te_activation_func=True`` is
  Megatron's switch that makes ``MLP`` call that submodule on ``[gate | up]``), and the fused
  q/k RoPE kernel as ``PackedCoreAttention``'s ``rope_fn``,
* ``"te"`` (``auto`` with Transformer Engine on CUDA): Megatron's ``TENorm`` and TE's SwiGLU
  op in those slots, the Triton RoPE (TE's RoPE has no per-token positions). Not runnable on
  our machines (no TE): untested.

Parameter names and shapes are the same for all three (``...layernorm.weight``; the
activation has no parameters), so checkpoints and HF conversion are unaffected.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hbp import kernels
from megatron_hbp.kernels.utils import is_interpreting
from megatron_hbp.mcore.attention import PackedCoreAttention, RopeSpec, _te_available
from megatron_hbp.model_config import ModelConfig

LAYER_KERNELS = ("auto", "triton", "torch")


def resolve_layer_kernels(requested: str, *, on_cuda: bool, te_available: bool, interpreting: bool) -> str:
    """The ``layer_kernels`` rule as a pure function: ``"te"``, ``"triton"`` or ``"torch"``.

    ``auto``: TE when it is installed and CUDA is present, else Triton on CUDA, else torch.
    ``triton`` without CUDA needs the Triton interpreter (``TRITON_INTERPRET=1`` set before the
    process imports the kernels: tests); otherwise a ``ValueError`` names the fix.
    """
    if requested not in LAYER_KERNELS:
        raise ValueError(f"layer_kernels '{requested}' unknown; choose one of {', '.join(LAYER_KERNELS)}")
    if requested == "auto":
        if on_cuda and te_available:
            return "te"
        return "triton" if on_cuda else "torch"
    if requested == "triton" and not on_cuda and not interpreting:
        raise ValueError(
            "layer_kernels 'triton' needs CUDA (or TRITON_INTERPRET=1 in the environment before start, "
            "for tests); use layer_kernels: torch or auto"
        )
    return requested


def select_layer_kernels(requested: str = "auto") -> str:
    """Resolve ``requested`` for this process (see :func:`resolve_layer_kernels`)."""
    on_cuda = torch.cuda.is_available()
    return resolve_layer_kernels(
        requested, on_cuda=on_cuda, te_available=on_cuda and _te_available(), interpreting=is_interpreting()
    )


class TritonRMSNorm(kernels.RMSNorm):
    """Megatron norm builder (``config, hidden_size, eps``) -> ``torch.nn.RMSNorm`` computed by the
    Triton kernel (same ``weight`` parameter as Megatron's ``WrappedTorchNorm``)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        if config.sequence_parallel:
            raise ValueError(
                "layer_kernels 'triton': sequence_parallel is not supported; set layer_kernels: te"
            )
        super().__init__(hidden_size, eps=eps, backend="triton")


class TritonSwiGLU(kernels.SwiGLU):
    """Megatron MLP ``activation_func`` submodule (built with ``config=``): ``silu(gate) * up`` on
    ``linear_fc1``'s ``[gate | up]`` output."""

    def __init__(self, config: TransformerConfig | None = None):
        super().__init__(backend="triton")


def torch_rope_qk(query, key, position_ids, inv_freq):
    """The unfused RoPE (``attention.apply_rope``) on q and k."""
    from megatron_hbp.mcore.attention import apply_rope

    return apply_rope(query, position_ids, inv_freq), apply_rope(key, position_ids, inv_freq)


def triton_rope_qk(query, key, position_ids, inv_freq):
    """The fused q/k RoPE kernel (``megatron_hbp.kernels.rope_qk``)."""
    return kernels.rope_qk(query, key, position_ids, inv_freq.float(), backend="triton")


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
    layer_kernels: str = "torch",
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``model_cfg``; per-token loss (stable loss) on.

    Context parallelism is ours (``context_parallel_size`` stays 1): Megatron sees every
    data x context rank as data parallel, which is exactly how HBP reduces gradients.
    ``layer_kernels`` (resolved): with ``triton``/``te`` the MLP calls its ``activation_func``
    submodule on ``[gate | up]`` (``use_te_activation_func``, Megatron's name for that switch).
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
    if layer_kernels not in ("te", "triton", "torch"):
        raise ValueError(f"layer_kernels must be resolved to te, triton or torch, got '{layer_kernels}'")
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
        use_te_activation_func=layer_kernels != "torch",
    )


def _with_activation(mlp, activation):
    """The local spec's MLP builder with ``activation`` as its ``activation_func`` submodule."""
    if isinstance(mlp, ModuleSpec):
        return dataclasses.replace(
            mlp, submodules=dataclasses.replace(mlp.submodules, activation_func=activation)
        )
    if isinstance(mlp, functools.partial) and "submodules" in mlp.keywords:
        keywords = dict(mlp.keywords)
        keywords["submodules"] = dataclasses.replace(keywords["submodules"], activation_func=activation)
        return functools.partial(mlp.func, *mlp.args, **keywords)
    raise TypeError(f"unexpected MLP spec {mlp!r} in Megatron's local layer spec; update _with_activation")


def _layer_modules(layer_kernels: str):
    """(norm builder, MLP activation builder, rope_fn) for a resolved ``layer_kernels``."""
    if layer_kernels == "triton":
        return TritonRMSNorm, TritonSwiGLU, triton_rope_qk
    if layer_kernels == "te":  # pragma: no cover - needs Transformer Engine
        from megatron.core.extensions.transformer_engine import TEActivationOp, TENorm

        return TENorm, TEActivationOp, triton_rope_qk
    return None, None, torch_rope_qk


def build_layer_spec(model_cfg: ModelConfig, attention_backend: str = "auto", layer_kernels: str = "torch"):
    """Megatron local layer spec with our packed core attention in the ``core_attention`` slot and,
    for ``layer_kernels`` ``triton``/``te``, their norm, activation and RoPE (module docstring)."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    norm, activation, rope_fn = _layer_modules(layer_kernels)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        PackedCoreAttention, rope=rope_spec(model_cfg), backend=attention_backend, rope_fn=rope_fn
    )
    if norm is not None:
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
        spec.submodules.mlp = _with_activation(spec.submodules.mlp, activation)
    return spec


def build_block_spec(
    config: TransformerConfig, model_cfg: ModelConfig, attention_backend: str, layer_kernels: str
):
    """The layer spec (``torch``), or the block spec whose final norm is the layer kernels' norm."""
    layer = build_layer_spec(model_cfg, attention_backend, layer_kernels)
    norm, _, _ = _layer_modules(layer_kernels)
    if norm is None:
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=norm)


def build_model(
    model_cfg: ModelConfig,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    attention_backend: str = "auto",
    layer_kernels: str = "torch",
    pre_process: bool = True,
    post_process: bool = True,
    pg_collection=None,
) -> GPTModel:
    """Build the (TP/PP-local part of the) model on this rank. Needs Megatron's parallel state
    (``parallel_state.initialize_model_parallel``) and an RNG tracker seeded
    (``model_parallel_cuda_manual_seed``). ``layer_kernels``: ``auto``/``triton``/``torch``
    (resolved here by :func:`select_layer_kernels`) or an already resolved ``te``."""
    if layer_kernels != "te":
        layer_kernels = select_layer_kernels(layer_kernels)
    config = transformer_config(model_cfg, tp=tp, pp=pp, dtype=dtype, layer_kernels=layer_kernels)
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_block_spec(config, model_cfg, attention_backend, layer_kernels),
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
