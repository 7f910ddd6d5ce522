"""SwiGLU ``silu(gate) · up`` on the fused gate|up projection output: Triton fwd/bwd, fp32 reference.

Public API::

    swiglu(z, backend="auto") -> [..., F]     z = [..., 2F] = [gate | up]
    swiglu_reference(z)                       fp32 PyTorch
    SwiGLU()                                  torch.nn.Module calling ``swiglu``

The input layout is Megatron's (``torch.chunk(z, 2, -1)`` of ``linear_fc1``'s output, also
per tensor-parallel rank). Only ``z`` is saved for the backward (the unfused path saves
``gate``, ``silu(gate)`` and ``up``). ``backend`` as in ``rms_norm``.
"""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from . import kernel as _kernel
from .reference import swiglu_reference

__all__ = ["SwiGLU", "swiglu", "swiglu_reference"]


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        z2d = z.reshape(-1, z.shape[-1]).contiguous()
        out = _kernel.swiglu_fwd(z2d)
        ctx.save_for_backward(z2d)
        ctx.shape = z.shape
        return out.view(*z.shape[:-1], z.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dout):
        (z2d,) = ctx.saved_tensors
        dout2d = dout.reshape(-1, z2d.shape[-1] // 2).contiguous()
        return _kernel.swiglu_bwd(z2d, dout2d).view(ctx.shape)


def swiglu(z: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(z[..., :F]) · z[..., F:]`` for ``z [..., 2F]``; differentiable."""
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] % 2:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"swiglu: input must be [..., 2F] (gate | up), got {shape}")
    if z.dtype not in _kernel._SUPPORTED_DTYPES:
        raise ValueError(f"swiglu: dtype {z.dtype} unsupported; use float32, bfloat16 or float16")
    if resolve_backend(backend, z.device, "swiglu") == "torch":
        return swiglu_reference(z)
    return _SwiGLUFunction.apply(z)


class SwiGLU(torch.nn.Module):
    """``swiglu`` as a module (no parameters)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return swiglu(z, backend=self.backend)
