"""The chunked PyTorch implementation (the CPU fallback): the online-softmax state over
``[Tc, Vc]`` chunks of fp32 logits and the logits gradient of one chunk. Memory per chunk is
bounded by :func:`.common._chunk_sizes`; the ``[T, V]`` logits never exist."""

from __future__ import annotations

import torch


def _torch_online_update(state, z: torch.Tensor, local_label: torch.Tensor, v0: int):
    """PyTorch twin of ``_online_update`` for an fp32 [Tc, Vc] chunk starting at column v0."""
    m, s, tgt = state
    m_new = torch.maximum(m, z.amax(dim=1))
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    s = s * torch.exp(m - shift) + torch.exp(z - shift[:, None]).sum(dim=1)
    col = local_label - v0
    hit = (col >= 0) & (col < z.shape[1])
    tgt = tgt + torch.where(
        hit, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None])[:, 0], torch.zeros_like(tgt)
    )
    return m_new, s, tgt


def _stats_torch(source, labels: torch.Tensor, vocab_start: int, Tc: int, Vc: int, linear: bool):
    """Local (m, s, tgt) [T] fp32 from chunks of logits (``source`` = logits or (hidden, weight))."""
    if linear:
        hidden, weight = source
        T, V = hidden.shape[0], weight.shape[0]
    else:
        T, V = source.shape
    device = labels.device
    m = torch.full((T,), float("-inf"), dtype=torch.float32, device=device)
    s = torch.zeros(T, dtype=torch.float32, device=device)
    tgt = torch.zeros(T, dtype=torch.float32, device=device)
    local_label = labels.to(torch.int64) - vocab_start
    for t0 in range(0, T, Tc):
        t1 = min(t0 + Tc, T)
        state = (m[t0:t1], s[t0:t1], tgt[t0:t1])
        for v0 in range(0, V, Vc):
            v1 = min(v0 + Vc, V)
            if linear:
                z = hidden[t0:t1].float() @ weight[v0:v1].float().T
            else:
                z = source[t0:t1, v0:v1].float()
            state = _torch_online_update(state, z, local_label[t0:t1], v0)
        m[t0:t1], s[t0:t1], tgt[t0:t1] = state
    return m, s, tgt


def _dlogits_torch(z, labels, is_loss_token, lse, g, label_shift):
    """fp32 (softmax − onehot)·g for one chunk, zero rows for ignored tokens."""
    dz = torch.exp(z - lse[:, None])
    col = labels.to(torch.int64) - label_shift
    hit = is_loss_token & (col >= 0) & (col < z.shape[1])
    # scatter_add instead of boolean indexing: no data-dependent shapes, no host sync.
    dz.scatter_add_(1, col.clamp(0, z.shape[1] - 1)[:, None], -hit.to(dz.dtype)[:, None])
    dz = dz * g
    return torch.where(is_loss_token[:, None], dz, torch.zeros_like(dz))
