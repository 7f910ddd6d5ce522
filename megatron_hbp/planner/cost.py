"""Attention cost of packs, per context-parallel rank, under the zigzag (load-balanced) CP split.

Semantics (shared with ``megatron_hbp.kernels.attention_cost_reference``, its torch twin):
entry ``[p, r]`` = number of causal (q, k) pairs ``0 <= k <= q < l`` of the documents of pack
``p`` whose query position ``q`` lies on CP rank ``r``. Each document of real length ``l`` is
padded to ``L = ceil(l / 2cp) * 2cp``, cut into ``2cp`` chunks of ``L / 2cp`` positions, and rank
``r`` holds chunks ``r`` and ``2cp-1-r``. Padding positions count nothing (a query ``q >= l``
has no pairs; keys ``k <= q < l`` are always real).

Closed form: chunk ``j`` covers queries ``[j*s, min((j+1)*s, l))`` and query ``q`` has ``q+1``
pairs, so its count is ``T(b) - T(a)`` with ``T(n) = n(n+1)/2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _tri(n: np.ndarray) -> np.ndarray:
    return n * (n + 1) // 2


def zigzag_doc_cost(lengths: np.ndarray, cp: int) -> np.ndarray:
    """Causal pairs per CP rank of each document: ``[n, cp] int64`` (rows sum to ``l(l+1)/2``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if cp < 1:
        raise ValueError(f"cp must be >= 1, got {cp}")
    nch = 2 * cp
    s = -(-lengths // nch)  # chunk size = padded length / 2cp
    j = np.arange(nch, dtype=np.int64)
    a = np.minimum(s[:, None] * j[None, :], lengths[:, None])
    b = np.minimum(a + s[:, None], lengths[:, None])
    chunk = _tri(b) - _tri(a)  # [n, 2cp]
    return chunk[:, :cp] + chunk[:, ::-1][:, :cp]


def zigzag_attention_cost_flat(lengths: np.ndarray, pack_offsets: np.ndarray, cp: int) -> np.ndarray:
    """Per-pack, per-rank causal pairs: ``[P, cp] int64``.

    Args:
        lengths: ``[n]`` document lengths (int).
        pack_offsets: ``[P+1]`` non-decreasing int, pack ``p`` holds
            ``lengths[pack_offsets[p]:pack_offsets[p+1]]`` (need not start at 0; empty packs allowed).
        cp: context-parallel degree.
    """
    pack_offsets = np.asarray(pack_offsets, dtype=np.int64)
    P = len(pack_offsets) - 1
    out = np.zeros((P, cp), dtype=np.int64)
    if P <= 0 or pack_offsets[-1] == pack_offsets[0]:
        return out
    if (np.diff(pack_offsets) < 0).any() or pack_offsets[0] < 0 or pack_offsets[-1] > len(lengths):
        raise ValueError(f"pack_offsets must be non-decreasing within [0, {len(lengths)}]")
    doc = zigzag_doc_cost(np.asarray(lengths)[pack_offsets[0] : pack_offsets[-1]], cp)
    pack_of = np.repeat(np.arange(P), np.diff(pack_offsets))
    for r in range(cp):
        out[:, r] = np.bincount(pack_of, weights=doc[:, r], minlength=P).astype(np.int64)
    # bincount goes through float64: exact while a pack's pairs stay below 2**53 (packs < ~1e8 tokens).
    return out


def zigzag_attention_cost(packs: Sequence[np.ndarray], cp: int) -> np.ndarray:
    """``[P, cp] int64`` causal pairs per rank for a list of packs, each ``[n_p]`` document lengths."""
    lens = [np.asarray(p, dtype=np.int64) for p in packs]
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lens])
    flat = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    return zigzag_attention_cost_flat(flat, offsets, cp)
