"""The pure HF <-> Megatron-Core tensor mapping (torch only, no megatron import).

Megatron-Core local-spec names (checked against a built ``GPTModel`` of megatron-core 0.19.2,
see tests/convert/test_convert_parity.py)::

    embedding.word_embeddings.weight                 [Vp/tp, h]        vocab-parallel (rows)
    decoder.layers.{i}.input_layernorm.weight        [h]               replicated
    decoder.layers.{i}.self_attention.linear_qkv.weight  [(nh+2ng)d/tp, h]  column-parallel, fused
    decoder.layers.{i}.self_attention.linear_qkv.bias    [(nh+2ng)d/tp]     (Qwen2 only)
    decoder.layers.{i}.self_attention.linear_proj.weight [h, nh*d/tp]   row-parallel
    decoder.layers.{i}.pre_mlp_layernorm.weight      [h]               replicated
    decoder.layers.{i}.mlp.linear_fc1.weight         [2f/tp, h]        column-parallel, [gate_r; up_r]
    decoder.layers.{i}.mlp.linear_fc2.weight         [h, f/tp]         row-parallel
    decoder.final_layernorm.weight                   [h]               replicated
    output_layer.weight                              [Vp/tp, h]        (untied only)

Fused QKV layout (``SelfAttention.get_query_key_value_tensors``): the output rows are ``ng``
query groups, each ``[the group's nh/ng query heads, its k head, its v head]`` of ``d``
rows per head, so a contiguous TP chunk is a whole number of groups. SwiGLU's ``linear_fc1``
computes ``chunk(x, 2)`` on each rank's *local* output, so rank r holds
``cat(gate[r-th chunk], up[r-th chunk])``, not a chunk of ``cat(gate, up)``.
Vocabulary rows are zero-padded to ``padded_vocab_size`` (a multiple of tp x divisor,
Megatron's ``make_vocab_size_divisible_by`` rule) and the padding is dropped on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hbp.model_config import ModelConfig

# kinds of mapping
REPLICATED, COLUMN, ROW, QKV, FC1, VOCAB = "replicated", "column", "row", "qkv", "fc1", "vocab"

HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""HF tensors that are buffers recomputed from the config (old LLaMA checkpoints store them)."""


def padded_vocab_size(vocab_size: int, tp: int, divisor: int = 128) -> int:
    """Megatron's rule: round ``vocab_size`` up to a multiple of ``divisor * tp``."""
    multiple = divisor * tp
    return -(-vocab_size // multiple) * multiple


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError unless ``tp`` divides every tensor-parallel dimension of ``cfg``."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(f"num_attention_heads={cfg.num_attention_heads}")
    if cfg.num_query_groups % tp:
        problems.append(f"num_query_groups (kv heads)={cfg.num_query_groups}")
    if cfg.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={cfg.ffn_hidden_size}")
    if problems:
        ok = [t for t in range(1, cfg.num_attention_heads + 1) if _divides_all(cfg, t)]
        raise ValueError(
            f"model '{cfg.name}': TP={tp} does not divide {', '.join(problems)}; choose a TP degree in {ok}"
        )


def _divides_all(cfg: ModelConfig, t: int) -> bool:
    return not (cfg.num_attention_heads % t or cfg.num_query_groups % t or cfg.ffn_hidden_size % t)


@dataclass(frozen=True)
class TensorMap:
    """One Megatron tensor and the HF tensors it is made of (in fusion order)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every Megatron tensor of ``cfg`` in checkpoint order, with its HF sources."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        maps.append(TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), REPLICATED))
        qkv = tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv")
        maps.append(TensorMap(m + "self_attention.linear_qkv.weight", qkv, QKV))
        if cfg.add_qkv_bias:
            qkv_b = tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv")
            maps.append(TensorMap(m + "self_attention.linear_qkv.bias", qkv_b, QKV))
        maps.append(TensorMap(m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), ROW))
        maps.append(
            TensorMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), REPLICATED)
        )
        fc1 = (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")
        maps.append(TensorMap(m + "mlp.linear_fc1.weight", fc1, FC1))
        maps.append(TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), ROW))
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB))
    return maps


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{hf_name: shape}`` of every tensor a HF checkpoint of ``cfg`` must hold."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.add_qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "mlp.gate_proj.weight"] = (f, h)
        out[p + "mlp.up_proj.weight"] = (f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def megatron_shape(tm: TensorMap, cfg: ModelConfig, tp: int, padded_vocab: int) -> tuple[int, ...]:
    """Shape of ``tm.megatron`` on one TP rank."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups
    if tm.kind == REPLICATED:
        return (h,)
    if tm.kind == VOCAB:
        return (padded_vocab // tp, h)
    if tm.kind == QKV:
        rows = (nh + 2 * ng) * d // tp
        return (rows, h) if tm.megatron.endswith("weight") else (rows,)
    if tm.kind == FC1:
        return (2 * f // tp, h)
    if tm.kind == ROW:
        cols = nh * d if "linear_proj" in tm.megatron else f
        return (h, cols // tp)
    raise AssertionError(tm.kind)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q ``[nh*d, ...]``, k/v ``[ng*d, ...]`` -> Megatron's interleaved ``[(nh+2ng)*d, ...]``."""
    ng = num_query_groups
    d = k.shape[0] // ng
    rest = q.shape[1:]
    return torch.cat(
        [q.reshape(ng, -1, d, *rest), k.reshape(ng, 1, d, *rest), v.reshape(ng, 1, d, *rest)], dim=1
    ).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`; returns contiguous ``(q, k, v)``."""
    nh, ng = num_attention_heads, num_query_groups
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (nh + 2 * ng)
    x = qkv.reshape(ng, nh // ng + 2, d, *rest)
    q = x[:, : nh // ng].reshape(nh * d, *rest).contiguous()
    k = x[:, nh // ng].reshape(ng * d, *rest).contiguous()
    v = x[:, nh // ng + 1].reshape(ng * d, *rest).contiguous()
    return q, k, v


def to_megatron(
    tm: TensorMap, hf: list[torch.Tensor], cfg: ModelConfig, tp: int, padded_vocab: int
) -> list[torch.Tensor]:
    """HF tensors of ``tm`` (in ``tm.hf`` order) -> the ``tp`` Megatron shards (rank order)."""
    if tm.kind == REPLICATED:
        return [hf[0]] * tp
    if tm.kind == VOCAB:
        (w,) = hf
        rows = padded_vocab // tp
        shards = []
        for r in range(tp):  # views of w; only shards that reach into the padding are copies
            part = w[r * rows : (r + 1) * rows]
            if part.shape[0] < rows:
                part = torch.cat([part, w.new_zeros(rows - part.shape[0], *w.shape[1:])])
            shards.append(part)
        return shards
    if tm.kind == QKV:
        return [c.contiguous() for c in fuse_qkv(*hf, cfg.num_query_groups).chunk(tp, dim=0)]
    if tm.kind == FC1:
        gate, up = hf
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    if tm.kind == COLUMN:
        return [c.contiguous() for c in hf[0].chunk(tp, dim=0)]
    if tm.kind == ROW:
        return [c.contiguous() for c in hf[0].chunk(tp, dim=1)]
    raise AssertionError(tm.kind)


def to_hf(tm: TensorMap, shards: list[torch.Tensor], cfg: ModelConfig) -> list[torch.Tensor]:
    """The TP shards of ``tm`` (rank order) -> its HF tensors (in ``tm.hf`` order)."""
    if tm.kind == REPLICATED:
        return [shards[0]]
    if tm.kind == VOCAB:
        return [torch.cat(shards)[: cfg.vocab_size].contiguous()]
    if tm.kind == QKV:
        return list(split_qkv(torch.cat(shards), cfg.num_attention_heads, cfg.num_query_groups))
    if tm.kind == FC1:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
    if tm.kind == COLUMN:
        return [torch.cat(shards)]
    if tm.kind == ROW:
        return [torch.cat(shards, dim=1)]
    raise AssertionError(tm.kind)
