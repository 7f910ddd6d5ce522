"""fp32 PyTorch reference of RoPE on packed THD tensors with per-token positions.

``x [T, H, D]`` (T packed tokens of this rank, any documents and any CP shard), ``positions
[T]`` integer (the position of each token inside its document: 0 at each document start),
``inv_freq [D/2]`` fp32 (Llama-3 frequency scaling, if any, is already applied to it). HF
Llama convention (rotate-half, not interleaved)::

    a_tj = fp32(positions_t) · inv_freq_j        (one fp32 multiply)
    out[..., :D/2] = x1 · cos a − x2 · sin a
    out[..., D/2:] = x2 · cos a + x1 · sin a     (x1 = x[..., :D/2], x2 = x[..., D/2:])

computed in fp32 and cast back to ``x``'s dtype. Identical to
``megatron_hbp.mcore.attention.apply_rope`` (the trainer's unfused path).
"""

from __future__ import annotations

import torch


def rope_reference(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
