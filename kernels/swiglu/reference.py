"""fp32 PyTorch reference of SwiGLU on the fused gate|up projection output.

``z [..., 2F]`` holds ``gate = z[..., :F]`` and ``up = z[..., F:]`` (Megatron's
``torch.chunk(z, 2, dim=-1)`` layout of ``linear_fc1``'s output, also per TP rank);
``out = silu(gate) · up`` in fp32, cast to ``z``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(z: torch.Tensor) -> torch.Tensor:
    gate, up = z.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(z.dtype)
