"""fp32 PyTorch reference of RMSNorm (optionally fused with the residual add).

``h = x + residual`` (rounded to the input dtype, as the unfused add would be), then
``y = h · rsqrt(mean(h², -1) + eps) · weight`` computed in fp32 and cast to the input dtype.
The same math as ``torch.nn.RMSNorm`` / Megatron's ``WrappedTorchNorm`` and TE's RMSNorm.
"""

from __future__ import annotations

import torch


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None
):
    """``y`` (or ``(y, h)`` when ``residual`` is given, ``h = x + residual``), differentiable."""
    h = x if residual is None else (x + residual)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)
