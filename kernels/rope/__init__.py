"""RoPE on packed THD q/k with per-token positions (documents restart at 0, any CP shard).

Public API::

    rope_qk(q, k, positions, inv_freq, backend="auto") -> (q_rot, k_rot)
    rope(x, positions, inv_freq, backend="auto") -> x_rot
    rope_reference(x, positions, inv_freq)          fp32 PyTorch

``q [T, Hq, D]``, ``k [T, Hk, D]`` (last dim contiguous; token/head strides free, e.g. the
views Megatron splits from the fused QKV output), ``positions [T]`` int32/int64,
``inv_freq [D/2]`` float32 — Llama-3 frequency scaling is whatever ``inv_freq`` carries
(``megatron_hbp.mcore.attention.rope_inv_freq`` builds it). The positions are per token, so
the context-parallel shard layout needs nothing special: pass the rank's shard of the
positions with its shard of q/k. ``backend`` as in ``rms_norm``. The Triton path saves only
``positions`` and ``inv_freq`` for the backward (the unfused path keeps fp32 cos/sin
tables and fp32 copies of q and k).
"""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from . import kernel as _kernel
from .reference import rope_reference

__all__ = ["rope", "rope_qk", "rope_reference"]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _RopeQKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return _kernel.rope_qk(_last_dim_contiguous(q), _last_dim_contiguous(k), positions, inv_freq, sign=1)

    @staticmethod
    def backward(ctx, dq, dk):
        positions, inv_freq = ctx.saved_tensors
        if dq is None or dk is None:
            raise RuntimeError("rope_qk backward: both outputs must receive a gradient")
        dq, dk = _kernel.rope_qk(
            _last_dim_contiguous(dq), _last_dim_contiguous(dk), positions, inv_freq, sign=-1
        )
        return dq, dk, None, None


def _check(q, k, positions, inv_freq, where: str) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be [T, heads, head_dim], got {shape}")
        if t.dtype not in _kernel._SUPPORTED_DTYPES:
            raise ValueError(f"{where}: {name} dtype {t.dtype} unsupported; use float32, bfloat16 or float16")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(
            f"{where}: k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} in tokens, "
            "head_dim, dtype and device"
        )
    if D % 2:
        raise ValueError(f"{where}: head_dim {D} must be even (rotate-half RoPE)")
    if positions.shape != (T,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{where}: positions must be int32/int64 [{T}] (one per token), got "
            f"{positions.dtype} {tuple(positions.shape)}"
        )
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(
            f"{where}: inv_freq must be float32 [{D // 2}] (head_dim / 2), got "
            f"{inv_freq.dtype} {tuple(inv_freq.shape)}"
        )
    if positions.device != q.device or inv_freq.device != q.device:
        raise ValueError(f"{where}: positions/inv_freq must be on q's device {q.device}")


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, backend: str = "auto"
):
    """Rotate q and k by their tokens' positions; differentiable in q and k."""
    _check(q, k, positions, inv_freq, "rope_qk")
    if resolve_backend(backend, q.device, "rope_qk") == "torch":
        return rope_reference(q, positions, inv_freq), rope_reference(k, positions, inv_freq)
    return _RopeQKFunction.apply(q, k, positions.contiguous(), inv_freq.contiguous())


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, backend: str = "auto"):
    """Rotate one ``[T, H, D]`` tensor (``rope_qk`` with an empty key tensor)."""
    out, _ = rope_qk(x, x[:, :0], positions, inv_freq, backend=backend)
    return out
