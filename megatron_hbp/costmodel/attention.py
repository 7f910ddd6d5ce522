"""Causal attention work per pack and CP rank under the zigzag split (NumPy).

The closed form lives in the planner (``megatron_hbp.planner.cost``, one implementation for
the whole NumPy side; ``megatron_hbp.kernels.attention_cost`` is its torch/Triton twin): each
document of real length l is padded to ``ceil(l / 2cp) * 2cp``, cut into 2cp chunks, and CP
rank r holds chunks r and 2cp-1-r. Entry ``[p, r]`` counts the causal pairs
``0 <= k <= q < l`` of the documents of pack p whose query q lies on rank r. This module only
adds input validation with messages that say what is wrong.
"""

from __future__ import annotations

import numpy as np

from megatron_hbp.planner.cost import zigzag_attention_cost_flat, zigzag_doc_cost

__all__ = ["zigzag_attention_pairs", "zigzag_doc_pairs"]


def zigzag_doc_pairs(doc_lengths: np.ndarray, cp: int) -> np.ndarray:
    """Causal pairs of each document per CP rank: int64 ``[num_docs, cp]``."""
    return zigzag_doc_cost(np.asarray(doc_lengths, dtype=np.int64), int(cp))


def zigzag_attention_pairs(doc_lengths: np.ndarray, pack_offsets: np.ndarray, cp: int) -> np.ndarray:
    """Causal (q, k) pairs per pack and CP rank: int64 ``[num_packs, cp]``.

    ``doc_lengths``: ``[num_docs]`` integers >= 0; ``pack_offsets``: ``[num_packs + 1]`` from 0 to
    num_docs, pack p holds documents ``pack_offsets[p]:pack_offsets[p+1]`` (empty packs allowed).
    """
    lengths = np.asarray(doc_lengths)
    offsets = np.asarray(pack_offsets)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(
            f"doc_lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}"
        )
    if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError("pack_offsets must be a 1-D integer array [num_packs + 1] starting at 0")
    if int(cp) < 1:
        raise ValueError(f"cp must be >= 1, got {cp}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"doc_lengths must be >= 0 (found {int(lengths.min())})")
    if offsets[0] != 0 or offsets[-1] != lengths.size or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"pack_offsets must be non-decreasing from 0 to len(doc_lengths)={lengths.size}; "
            f"got first={int(offsets[0])}, last={int(offsets[-1])}"
        )
    return zigzag_attention_cost_flat(lengths.astype(np.int64), offsets.astype(np.int64), int(cp))
