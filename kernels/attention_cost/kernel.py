"""Triton kernel of :func:`attention_cost` and its launcher.

One lane per pack, ``BLOCK_P = 128`` packs per program, a loop over the document slots of the
block's packs (int32 chunk bounds, int64 products). Run on an H100 (2026-11-26): exact, 19 % of
copy bandwidth at cp 1 (kernels/README.md). A tiled variant (``BLOCK_I`` documents of every
pack per loop step) was never timed on a GPU and was removed (issue 16); git history keeps it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import cdiv

BLOCK_P = 128


@triton.jit
def _pairs_in(a, b, length):
    """Causal pairs of the queries in [a, b) clipped to the real length: int32 bounds, int64 count."""
    hi = tl.minimum(b, length).to(tl.int64)
    lo = tl.minimum(a, length).to(tl.int64)
    return (hi - lo) * (hi + lo + 1)  # twice the count; always even, halved once by the caller


@triton.jit
def _attention_cost_kernel(
    lengths_ptr,
    offsets_ptr,
    out_ptr,
    num_packs,
    CP: tl.constexpr,
    CP_POW2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The default kernel (run on an H100, 2026-11-26: exact; 19 % of copy bandwidth at cp 1).
    One lane per pack; loop over the document slots of the block's packs."""
    pid = tl.program_id(0)
    offs_p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < num_packs
    start = tl.load(offsets_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + offs_p + 1, mask=mask_p, other=0).to(tl.int64)
    count = tl.where(mask_p, end - start, 0)
    max_count = tl.max(count, axis=0)

    rank = tl.arange(0, CP_POW2)[None, :]
    acc = tl.zeros([BLOCK_P, CP_POW2], dtype=tl.int64)
    # Slot i of every pack in the block; packs with fewer documents mask it off, so the
    # loop runs max(docs per pack in this block) times and reads each length once.
    for i in range(0, max_count):
        valid = i < count
        # Chunk bounds stay below 2^31 for lengths <= _max_doc_length(cp): 32-bit index math,
        # 64-bit only for the products (the count of one document can exceed 2^31).
        length = tl.load(lengths_ptr + start + i, mask=valid, other=0).to(tl.int32)[:, None]
        chunk = length // (2 * CP) + (length % (2 * CP) != 0).to(tl.int32)
        first = rank * chunk
        second = (2 * CP - 1 - rank) * chunk
        acc += (_pairs_in(first, first + chunk, length) + _pairs_in(second, second + chunk, length)) >> 1
    out_mask = mask_p[:, None] & (rank < CP)
    tl.store(out_ptr + offs_p[:, None] * CP + rank, acc, mask=out_mask)


def _attention_cost_triton(
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    cp: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel; ``out`` (``[num_packs, cp]`` int64, contiguous) lets tests poison it."""
    num_packs = offsets.numel() - 1
    if out is None:
        out = torch.empty((num_packs, cp), dtype=torch.int64, device=lengths.device)
    if num_packs == 0:
        return out
    _attention_cost_kernel[(cdiv(num_packs, BLOCK_P),)](
        lengths, offsets, out, num_packs, CP=cp, CP_POW2=triton.next_power_of_2(cp), BLOCK_P=BLOCK_P
    )
    return out
