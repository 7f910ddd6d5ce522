"""PyTorch implementation of :func:`attention_cost`: the CPU path and the tests' closed-form
oracle (chunked over documents, so memory stays bounded)."""

from __future__ import annotations

import torch

__all__ = ["attention_cost_reference"]

_REFERENCE_CHUNK_DOCS = 1 << 20


def _per_document_rank_pairs(lengths: torch.Tensor, cp: int) -> torch.Tensor:
    """[n] int64 lengths -> [n, cp] int64 causal pairs per (document, CP rank)."""
    length = lengths.to(torch.int64)[:, None]
    rank = torch.arange(cp, dtype=torch.int64, device=lengths.device)[None, :]
    chunk = (length + 2 * cp - 1) // (2 * cp)

    def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hi = torch.minimum(b, length)
        lo = torch.minimum(a, length)
        return hi * (hi + 1) // 2 - lo * (lo + 1) // 2

    return pairs(rank * chunk, (rank + 1) * chunk) + pairs(
        (2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk
    )


def attention_cost_reference(
    doc_lengths: torch.Tensor, pack_offsets: torch.Tensor, cp: int, *, chunk_docs: int = _REFERENCE_CHUNK_DOCS
) -> torch.Tensor:
    """PyTorch implementation of :func:`attention_cost` (the CPU path; same arguments).

    Processes ``chunk_docs`` documents at a time (pack of each document by ``searchsorted``
    over the offsets, then ``index_add_``), so memory is O(chunk_docs · cp + num_packs · cp).
    Reads the first and last offset on the host, so it syncs when given CUDA tensors.
    """
    lengths = doc_lengths.to(torch.int64)
    offsets = pack_offsets.to(torch.int64)
    num_packs = offsets.numel() - 1
    out = torch.zeros((max(num_packs, 0), cp), dtype=torch.int64, device=lengths.device)
    if num_packs <= 0:
        return out
    first, last = int(offsets[0]), int(offsets[-1])
    for d0 in range(first, last, chunk_docs):
        d1 = min(d0 + chunk_docs, last)
        doc_index = torch.arange(d0, d1, dtype=torch.int64, device=lengths.device)
        # right=True: with empty packs the last pack p with offsets[p] <= i holds document i.
        pack = torch.searchsorted(offsets, doc_index, right=True) - 1
        out.index_add_(0, pack, _per_document_rank_pairs(lengths[d0:d1], cp))
    return out
