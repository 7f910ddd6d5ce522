"""RMSNorm (optionally fused with the residual add): Triton forward/backward, fp32 reference.

Public API::

    rms_norm(x, weight, eps=1e-5, residual=None, backend="auto")
        -> y                   (residual is None)
        -> (y, x + residual)   (residual given: the sum is the next residual stream)
    rms_norm_reference(...)    fp32 PyTorch, same signature without ``backend``
    RMSNorm(hidden_size, eps)  torch.nn.RMSNorm subclass whose forward calls ``rms_norm``

``backend``: "auto" runs Triton on CUDA tensors and the PyTorch reference elsewhere;
"triton" on CPU tensors needs ``TRITON_INTERPRET=1`` (tests); "torch" always the reference.
dtypes float32 / bfloat16 / float16; fp32 math inside; outputs in ``x``'s dtype, ``dweight``
reduced in fp32 across row blocks and returned in ``weight``'s dtype.
"""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from . import kernel as _kernel
from .reference import rms_norm_reference

__all__ = ["RMSNorm", "rms_norm", "rms_norm_reference"]


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        H = x.shape[-1]
        x2d = x.reshape(-1, H).contiguous()
        r2d = residual.reshape(-1, H).contiguous() if residual is not None else None
        w = weight.contiguous()
        y, h, rstd = _kernel.rms_norm_fwd(x2d, w, eps, r2d)
        ctx.has_residual = residual is not None
        ctx.shape = x.shape
        ctx.save_for_backward(h if h is not None else x2d, w, rstd)
        y = y.view(x.shape)
        if residual is None:
            return y
        return y, h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h2d, w, rstd = ctx.saved_tensors
        H = h2d.shape[-1]
        if dy is None:
            dy = torch.zeros(ctx.shape, dtype=h2d.dtype, device=h2d.device)
        dy2d = dy.reshape(-1, H).contiguous()
        dho2d = dh_out.reshape(-1, H).contiguous() if (ctx.has_residual and dh_out is not None) else None
        dh, dw = _kernel.rms_norm_bwd(dy2d, h2d, w, rstd, dho2d)
        dh = dh.view(ctx.shape)
        dres = dh if ctx.has_residual and ctx.needs_input_grad[2] else None
        return dh, dw, dres, None


def _check(x, weight, residual, eps) -> None:
    where = "rms_norm"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{where}: x must be a tensor [..., H], got {type(x).__name__}")
    if x.dtype not in _kernel._SUPPORTED_DTYPES:
        raise ValueError(f"{where}: x dtype {x.dtype} unsupported; use float32, bfloat16 or float16")
    H = x.shape[-1]
    if not 1 <= H <= _kernel.MAX_HIDDEN:
        raise ValueError(f"{where}: hidden size {H} outside [1, {_kernel.MAX_HIDDEN}]")
    if weight.shape != (H,):
        raise ValueError(f"{where}: weight shape {tuple(weight.shape)} must be ({H},), the last dim of x")
    if weight.device != x.device:
        raise ValueError(f"{where}: weight on {weight.device} but x on {x.device}; move them together")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"{where}: residual {tuple(residual.shape)} {residual.dtype} must match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    if not eps > 0:
        raise ValueError(f"{where}: eps must be > 0, got {eps}")


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str = "auto",
):
    """RMSNorm over the last dim of ``x`` (see the module docstring); differentiable."""
    _check(x, weight, residual, eps)
    if resolve_backend(backend, x.device, "rms_norm") == "torch":
        return rms_norm_reference(x, weight, eps, residual)
    return _RMSNormFunction.apply(x, weight, residual, float(eps))


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` (same parameter ``weight``, same state dict) computed by :func:`rms_norm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, backend: str = "auto", **kwargs):
        super().__init__(hidden_size, eps=eps, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, backend=self.backend)
