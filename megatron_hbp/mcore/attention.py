"""Packed THD core attention: causal within each document of a micro-batch, never across.

Megatron-Core's local ``DotProductAttention`` refuses packed sequences and context
parallelism (ENVIRONMENT.md), so the layer spec puts :class:`PackedCoreAttention` in the
``core_attention`` slot. It receives q/k/v as ``[t, heads, head_dim]`` (this rank's tokens,
local heads under TP) and returns ``[t, heads * head_dim]``.

RoPE is applied here, not by Megatron: Megatron's THD RoPE reads the context-parallel group
fixed at model construction (``pg_collection.cp``), while HBP changes the CP degree from
step to step. Our batches carry each token's position (restarting at 0 per document, CP
sharded like the tokens) in :class:`HBPPackedSeqParams`, so RoPE is a gather by position and
needs no group at all. Llama-3 frequency scaling is supported with all four parameters.

Backends (``select_backend``):

* ``"te"``: Transformer Engine's fused attention, THD format (when ``transformer_engine``
  imports; not installable on our machines, so this path is untested here),
* ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` on CUDA, fp16/bf16 only (flash attention, K/V
  heads expanded for GQA, causal = ``window_size=(-1, 0)``),
* ``"sdpa"``: PyTorch SDPA per document (CPU and any device; the reference).

When a step's CP degree is > 1 the module calls ``megatron_hbp.cp.ulysses_attention`` (or the
all-gather ``cp_attention``, per the packed params' ``cp_impl``) with the step's CP group from the packed params, the CPU copies of the global ``cu_seqlens`` (no
device-to-host sync) and the configured backend (``te`` -> ``auto``, see ``cp_seam.cp_backend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

BACKENDS = ("auto", "te", "varlen", "sdpa")


@dataclass
class HBPPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` plus what the HBP attention needs without host syncs.

    ``cu_seqlens_q/kv`` and ``cu_seqlens_q/kv_padded`` are GLOBAL (the whole micro-batch of
    the replica, before CP sharding), int32 ``[n+1]``. ``cp_group``/``local_cp_size`` are the
    step's CP group (None / 1 when cp == 1).
    """

    position_ids: torch.Tensor | None = None
    """int64 ``[t_local]``: RoPE position of each local token (0 at each document start)."""
    padded_lengths_host: list[int] = field(default_factory=list)
    """Padded length of each document (python ints, from the plan: no device->host sync)."""
    lengths_host: list[int] = field(default_factory=list)
    """Real length of each document (python ints)."""
    cu_seqlens_cpu: torch.Tensor | None = None
    """int32 ``[n+1]`` global real boundaries on the CPU (CP attention reads them without a sync)."""
    cu_seqlens_padded_cpu: torch.Tensor | None = None
    """int32 ``[n+1]`` global padded boundaries on the CPU."""
    cp_impl: str = "ulysses"
    """CP attention of steps with ``local_cp_size > 1``: ``ulysses`` or ``allgather`` (the trainer's
    resolved ``cp_backend``, ``megatron_hbp.mcore.cp_seam.resolve_cp_impl``)."""


@dataclass(frozen=True)
class RopeSpec:
    """RoPE settings of the model (HF Llama convention: rotate-half, not interleaved)."""

    theta: float = 10000.0
    scaling_factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, spec: RopeSpec) -> torch.Tensor:
    """fp32 ``[head_dim // 2]`` inverse frequencies, Llama-3 scaled when ``spec.scaling_factor``."""
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if spec.scaling_factor is not None:
        factor = spec.scaling_factor
        old = spec.original_max_position_embeddings
        low_wavelen = old / spec.low_freq_factor
        high_wavelen = old / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [t, h, d]`` by positions ``[t]`` (rotate-half convention), in fp32, cast back."""
    freqs = position_ids.to(torch.float32)[:, None] * inv_freq.to(x.device)[None, :]  # [t, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [t, 1, d]
    cos, sin = emb.cos(), emb.sin()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


HALF_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(
    requested: str, *, on_cuda: bool, dtype: torch.dtype | None, te_available: bool, varlen_available: bool
) -> str:
    """The attention backend rule, as a pure function of the environment (testable without CUDA).

    ``auto`` picks ``te``, then ``varlen``, only on CUDA with fp16/bf16 activations (both are
    flash/fused kernels without fp32 support), else ``sdpa``: the one rule,
    ``megatron_hbp.cp.auto_attention_backend`` (through ``cp_seam``), which CP steps use too. An explicit ``te``/``varlen`` the environment cannot run is a
    ``ValueError`` naming the fix. ``dtype=None`` (unknown) skips the dtype condition.
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend '{requested}' unknown; choose one of {', '.join(BACKENDS)}")
    half = dtype is None or dtype in HALF_DTYPES
    if requested == "auto":
        from megatron_hbp.mcore.cp_seam import auto_attention_backend

        return auto_attention_backend(
            on_cuda=on_cuda, half=half, varlen_available=varlen_available, te_available=te_available
        )
    if requested == "te" and not (on_cuda and te_available):
        raise ValueError("attention backend 'te' needs CUDA and transformer_engine; use 'varlen' or 'sdpa'")
    if requested == "varlen" and not (on_cuda and varlen_available):
        raise ValueError(
            "attention backend 'varlen' needs CUDA and torch.nn.attention.varlen (torch >= 2.11); use 'sdpa'"
        )
    if requested in ("te", "varlen") and not half:
        raise ValueError(
            f"attention backend '{requested}' needs fp16/bf16 activations, got {dtype}; "
            "set dtype: bf16 or attention_backend: sdpa (or auto)"
        )
    return requested


def select_backend(
    requested: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> str:
    """Resolve ``requested`` for ``device`` and activation ``dtype`` (see :func:`resolve_backend`)."""
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    return resolve_backend(
        requested,
        on_cuda=on_cuda,
        dtype=dtype,
        te_available=on_cuda and _te_available(),
        varlen_available=on_cuda and _varlen_available(),
    )


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    seqlens_host: list[int],
    *,
    backend: str = "sdpa",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention inside each document of a packed stream.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA).
        cu_seqlens: int32 ``[n+1]`` document boundaries (padded spans: padding sits at the end
            of a document, so causality keeps real tokens unaffected by it).
        seqlens_host: the ``n`` document lengths as python ints (no device sync).
        backend: ``"sdpa"``, ``"varlen"`` or ``"te"`` (already resolved).
    Returns:
        ``[T, Hq, D]``, dtype of q.
    """
    hq, hkv = q.shape[1], k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "sdpa":
        outs = []
        start = 0
        for n in seqlens_host:
            if n == 0:
                continue
            sl = slice(start, start + n)
            qd, kd, vd = (t[sl].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
            outs.append(
                F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=hq != hkv)
                .transpose(0, 1)
                .contiguous()
            )
            start += n
        if start != q.shape[0]:
            raise ValueError(f"document lengths sum to {start} but the packed stream has {q.shape[0]} tokens")
        return torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        if hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        max_len = max(seqlens_host) if seqlens_host else 0
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0))
    if backend == "te":
        return _te_attention(q, k, v, cu_seqlens, seqlens_host, scale)
    raise ValueError(f"unknown attention backend '{backend}'")


_TE_MODULES: dict = {}


def _te_attention(q, k, v, cu_seqlens, seqlens_host, scale):  # pragma: no cover - needs TE + CUDA
    import transformer_engine.pytorch as te

    key = (q.shape[1], k.shape[1], q.shape[2], scale)
    if key not in _TE_MODULES:
        _TE_MODULES[key] = te.DotProductAttention(
            num_attention_heads=q.shape[1],
            kv_channels=q.shape[2],
            num_gqa_groups=k.shape[1],
            attn_mask_type="padding_causal",
            qkv_format="thd",
            softmax_scale=scale,
        )
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = max(seqlens_host) if seqlens_host else 0
    out = _TE_MODULES[key](
        q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )
    return out.view(q.shape)


class PackedCoreAttention(MegatronModule):
    """``core_attention`` for Megatron's ``SelfAttention`` (local spec), THD packed only.

    Constructed by Megatron with the usual core-attention keyword arguments; ``rope`` and
    ``backend`` come from :func:`megatron_hbp.mcore.model.build_layer_spec`.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        *,
        rope: RopeSpec | None = None,
        backend: str = "auto",
        rope_fn=None,
    ):
        super().__init__(config=config)
        # (q, k, positions, inv_freq) -> (q, k) rotated; None: the unfused apply_rope (model.py picks).
        self.rope_fn = rope_fn or (lambda q, k, pos, inv: (apply_rope(q, pos, inv), apply_rope(k, pos, inv)))
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        # params_dtype is the activation dtype too (build_model: bf16 -> params_dtype bf16).
        self.backend = select_backend(backend, dtype=getattr(config, "params_dtype", None))
        # CP > 1 steps go through megatron_hbp.cp, which resolves "auto" per tensor dtype itself.
        self.requested_backend = backend
        self.rope = rope
        if rope is not None:
            self.register_buffer("inv_freq", rope_inv_freq(config.kv_channels, rope), persistent=False)
        else:
            self.inv_freq = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: HBPPackedSeqParams | None = None,
    ) -> torch.Tensor:
        """q ``[t, Hq, D]``, k/v ``[t, Hkv, D]`` -> ``[t, Hq * D]``."""
        p = packed_seq_params
        if p is None or p.qkv_format != "thd" or not isinstance(p, HBPPackedSeqParams):
            raise ValueError(
                "PackedCoreAttention needs HBPPackedSeqParams with qkv_format='thd' "
                "(build batches with megatron_hbp.mcore.batch)"
            )
        if query.dim() == 4:  # [t, 1, h, d] when Megatron did not squeeze
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        if self.inv_freq is not None:
            query, key = self.rope_fn(query, key, p.position_ids, self.inv_freq)
        cp = p.local_cp_size or 1
        if cp > 1:
            from megatron_hbp.mcore.cp_seam import cp_attention

            out = cp_attention(
                query,
                key,
                value,
                p.cu_seqlens_padded_cpu if p.cu_seqlens_padded_cpu is not None else p.cu_seqlens_q_padded,
                p.cu_seqlens_cpu if p.cu_seqlens_cpu is not None else p.cu_seqlens_q,
                p.cp_group,
                softmax_scale=self.softmax_scale,
                backend=self.requested_backend,
                cp_impl=p.cp_impl,
            )
        else:
            out = packed_attention(
                query,
                key,
                value,
                p.cu_seqlens_q_padded,
                p.padded_lengths_host,
                backend=self.backend,
                softmax_scale=self.softmax_scale,
            )
        return out.reshape(out.shape[0], -1)
