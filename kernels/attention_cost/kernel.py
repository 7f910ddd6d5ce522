"""Exact causal-attention work per pack and context-parallel rank (zigzag CP split).

Math
----
A document of real length ``l`` is padded to ``L = 2·cp·c`` with ``c = ceil(l / (2·cp))``
and cut into ``2·cp`` chunks of ``c`` positions; CP rank ``r`` holds chunks ``r`` and
``2·cp − 1 − r`` (the load-balanced "zigzag" split of Transformer Engine / Megatron for
packed sequences). A query at real position ``q < l`` attends to the ``q + 1`` keys
``0 ≤ k ≤ q``; padding positions (``q ≥ l``) count nothing. The pairs of the queries in
``[a, b)`` clipped to the real length are

    P(a, b) = S(min(b, l)) − S(min(a, l)),   S(n) = n(n+1)/2 = Σ_{q<n} (q + 1)
            = (hi − lo)(hi + lo + 1) / 2      with hi = min(b, l), lo = min(a, l),

so rank ``r`` gets ``P(r·c, (r+1)·c) + P((2cp−1−r)·c, (2cp−r)·c)`` from each document: O(1)
per (document, rank), O(docs·cp) per call, independent of the number of tokens. With
``cp = 1`` the entry is Σ l(l+1)/2. Counts are int64 (exact up to 2⁶³); the kernel keeps
chunk bounds in 32 bits (lengths up to 2³¹ − 2·cp) and widens only for the products.

Layout: two Triton kernels -- the default (one lane per pack, a loop over document slots;
GPU-verified) and an opt-in tiled one (each loop step reads the next ``BLOCK_I`` documents of
every pack, a contiguous row per pack; not yet timed on a GPU) -- a PyTorch reference that
is also the CPU fallback (chunked over documents, so memory stays bounded), and the public
:func:`attention_cost`. No autograd: the result is
an integer count. :func:`attention_pairs_to_flops` turns pairs into FLOPs for a model shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import cdiv, resolve_backend

__all__ = ["attention_cost", "attention_cost_reference", "attention_pairs_to_flops"]


def _max_doc_length(cp: int) -> int:
    """Longest document the kernel handles exactly: its padded length 2·cp·ceil(l/(2·cp)) must
    fit in int32 (the kernel's index math). Far above any real sequence; checked only when
    validating on the host (CUDA inputs are not checked, to avoid a sync)."""
    return 2**31 - 2 * cp


_REFERENCE_CHUNK_DOCS = 1 << 20


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _twice_pairs_in(a, b, length):
    """Twice the causal pairs of the queries in [a, b) clipped to the real length (uint32 bounds).

    hi + lo + 1 <= 2·length + 1 < 2^32 fits uint32 and (hi − lo) < 2^31, so the widening
    product is exact and below 2^63 (one 32x32 -> 64-bit multiply)."""
    hi = tl.minimum(b, length)
    lo = tl.minimum(a, length)
    return (hi - lo).to(tl.uint64) * (hi + lo + 1).to(tl.uint64)


@triton.jit
def _attention_cost_tiled_kernel(
    lengths_ptr,
    offsets_ptr,
    out_ptr,
    num_packs,
    CP: tl.constexpr,
    CP_POW2: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # BLOCK_P packs per program; each loop step reads the next BLOCK_I documents of every
    # pack (a contiguous row per pack, masked past its end) as a [BLOCK_P, BLOCK_I] tile and
    # sums their [BLOCK_P, BLOCK_I, CP_POW2] pair counts over the documents.
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_packs
    start = tl.load(offsets_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + offs_p + 1, mask=mask_p, other=0).to(tl.int64)
    count = tl.where(mask_p, end - start, 0)
    max_count = tl.max(count, axis=0)

    rank = tl.arange(0, CP_POW2)[None, None, :].to(tl.uint32)
    # Twice the pair counts, summed in uint64 (wraps modulo 2^64): halving at the end gives
    # every count below 2^63 exactly, without a shift per document.
    acc = tl.zeros([BLOCK_P, CP_POW2], dtype=tl.uint64)
    for i0 in range(0, max_count, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)[None, :]
        valid = i < count[:, None]
        # Chunk bounds stay below 2^31 for lengths <= _max_doc_length(cp): 32-bit (unsigned)
        # index math, 64-bit only for the products and sums. Masked slots count 0.
        length = tl.load(lengths_ptr + start[:, None] + i, mask=valid, other=0).to(tl.uint32)[:, :, None]
        chunk = (length + (2 * CP - 1)) // (2 * CP)
        first = rank * chunk
        second = (2 * CP - 1 - rank) * chunk  # ranks >= CP (padding of CP_POW2) are never stored
        twice = _twice_pairs_in(first, first + chunk, length) + _twice_pairs_in(
            second, second + chunk, length
        )
        acc += tl.sum(twice, axis=1)
    out_rank = tl.arange(0, CP_POW2)[None, :]
    out_mask = mask_p[:, None] & (out_rank < CP)
    tl.store(out_ptr + offs_p[:, None] * CP + out_rank, (acc >> 1).to(tl.int64), mask=out_mask)


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


def _default_config(cp: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_I, num_warps): tiles of about 1024 (document, rank) slots."""
    cp_pow2 = triton.next_power_of_2(cp)
    block_i = 16 if cp_pow2 <= 2 else 8
    return max(1024 // (block_i * cp_pow2), 2), block_i, 4


def _attention_cost_triton(
    lengths: torch.Tensor,
    offsets: torch.Tensor,
    cp: int,
    out: torch.Tensor | None = None,
    *,
    _block_p: int | None = None,
    _block_i: int | None = None,
    _num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the kernel; ``out`` (``[num_packs, cp]`` int64, contiguous) lets tests poison it.

    Without the private knobs the default kernel runs (one lane per pack, a loop over document
    slots: exact and 19 % of copy bandwidth at cp = 1 on an H100, 2026-11-26). Any of
    ``_block_p`` (packs per program), ``_block_i`` (documents of each pack per loop step) and
    ``_num_warps`` (powers of two) selects the tiled kernel, the rest from
    :func:`_default_config`: correct in the Triton interpreter and compiled for sm_90, not yet
    timed on a GPU (``python kernels/bench_attention_cost.py --sweep`` times both).
    """
    num_packs = offsets.numel() - 1
    if out is None:
        out = torch.empty((num_packs, cp), dtype=torch.int64, device=lengths.device)
    if num_packs == 0:
        return out
    if _block_p is None and _block_i is None and _num_warps is None:
        # the GPU-verified kernel stays the default until the tiled one is timed (see docstring)
        _attention_cost_kernel[(cdiv(num_packs, 128),)](
            lengths, offsets, out, num_packs, CP=cp, CP_POW2=triton.next_power_of_2(cp), BLOCK_P=128
        )
        return out
    block_p, block_i, num_warps = _default_config(cp)
    block_p = _block_p or block_p
    block_i = _block_i or block_i
    num_warps = _num_warps or num_warps
    grid = (cdiv(num_packs, block_p),)
    _attention_cost_tiled_kernel[grid](
        lengths,
        offsets,
        out,
        num_packs,
        CP=cp,
        CP_POW2=triton.next_power_of_2(cp),
        BLOCK_P=block_p,
        BLOCK_I=block_i,
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------- reference


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


# ----------------------------------------------------------------------------- public


def _validate(doc_lengths: torch.Tensor, pack_offsets: torch.Tensor, cp: int, check_values: bool) -> None:
    where = "attention_cost"
    for name, t in (("doc_lengths", doc_lengths), ("pack_offsets", pack_offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{where}: {name} must be 1-D, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{where}: {name} must be int32 or int64, got {t.dtype}; convert with .long()")
    if doc_lengths.device != pack_offsets.device:
        raise ValueError(
            f"{where}: doc_lengths is on {doc_lengths.device} but pack_offsets on {pack_offsets.device}; "
            "move both to the same device"
        )
    if pack_offsets.numel() < 1:
        raise ValueError(f"{where}: pack_offsets needs num_packs + 1 >= 1 entries (use [0] for no packs)")
    if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1:
        raise ValueError(f"{where}: cp must be an int >= 1, got {cp!r}")
    if not check_values:
        return
    num_docs = doc_lengths.numel()
    if num_docs and int(doc_lengths.min()) < 0:
        raise ValueError(f"{where}: doc_lengths must be >= 0; found {int(doc_lengths.min())}")
    if num_docs and int(doc_lengths.max()) > _max_doc_length(cp):
        raise ValueError(
            f"{where}: a document length {int(doc_lengths.max())} exceeds {_max_doc_length(cp)} (2^31 - 2*cp), "
            "the longest supported; split the document"
        )
    offsets = pack_offsets.to(torch.int64)
    if int(offsets[0]) < 0 or int(offsets[-1]) > num_docs:
        raise ValueError(
            f"{where}: pack_offsets must lie in [0, num_docs={num_docs}], got first={int(offsets[0])}, "
            f"last={int(offsets[-1])}"
        )
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        bad = int(torch.nonzero(offsets[1:] < offsets[:-1])[0, 0])
        raise ValueError(
            f"{where}: pack_offsets must be non-decreasing; offsets[{bad + 1}]={int(offsets[bad + 1])} < "
            f"offsets[{bad}]={int(offsets[bad])}"
        )


def attention_cost(
    doc_lengths: torch.Tensor,
    pack_offsets: torch.Tensor,
    cp: int,
    *,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Causal attention (query, key) pairs per pack and context-parallel rank.

    Args:
        doc_lengths: ``[num_docs]`` int32/int64, real token length of every document
            (0 ≤ l ≤ 2³¹ − 2·cp).
        pack_offsets: ``[num_packs + 1]`` int32/int64, non-decreasing; pack ``p`` holds the
            documents ``pack_offsets[p] : pack_offsets[p + 1]`` (empty packs allowed).
        cp: context-parallel degree ≥ 1. Each document is padded to a multiple of ``2·cp``
            and split into ``2·cp`` equal chunks; rank ``r`` holds chunks ``r`` and
            ``2·cp − 1 − r`` (zigzag / load-balanced split).
        backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" (CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or "torch".
        validate: check values (lengths ≥ 0, offsets non-decreasing and in range). Needs a
            host sync, so ``None`` (default) validates CPU inputs only; CUDA inputs then get
            shape/dtype checks only and the Triton path never syncs with the host.

    Returns:
        ``[num_packs, cp]`` int64 on the input device: entry ``[p, r]`` is the exact number of
        pairs ``0 ≤ k ≤ q < l`` over the documents of pack ``p`` whose query position ``q``
        lies on rank ``r`` (padding counts nothing). With ``cp = 1``: ``Σ l(l+1)/2``.
        Row sums over ranks equal the ``cp = 1`` value. See the module docstring for the
        closed form and :func:`attention_pairs_to_flops` for FLOPs.
    """
    _validate(
        doc_lengths,
        pack_offsets,
        cp,
        check_values=(doc_lengths.device.type == "cpu") if validate is None else validate,
    )
    chosen = resolve_backend(backend, doc_lengths.device, "attention_cost")
    num_packs = pack_offsets.numel() - 1
    if chosen == "torch":
        return attention_cost_reference(doc_lengths, pack_offsets, cp)
    if num_packs == 0 or doc_lengths.numel() == 0:
        # Shapes alone decide this: no documents means every pack is empty (no host sync).
        return torch.zeros((num_packs, cp), dtype=torch.int64, device=doc_lengths.device)
    return _attention_cost_triton(doc_lengths.contiguous(), pack_offsets.contiguous(), cp)


def attention_pairs_to_flops(
    pairs,
    *,
    num_heads: int,
    head_dim: int,
    num_layers: int = 1,
    include_backward: bool = True,
    backward_factor: float = 2.0,
):
    """Convert causal (query, key) pairs from :func:`attention_cost` into attention FLOPs.

    Per pair, head and layer the forward pass does two multiply-adds of length ``head_dim``
    (``q·k`` for the score and ``p·v`` for the output): ``4 · head_dim`` FLOPs. The backward
    pass (dQ, dK, dV, dP) costs ``backward_factor`` times the forward (2.0 by matmul count;
    2.5 if the kernel recomputes the scores, as FlashAttention does). Softmax, masking and
    projections are not included. For grouped-query attention use the number of *query*
    heads: the score work is per query head.

    Args:
        pairs: a Python int or an integer tensor of any shape (e.g. ``[num_packs, cp]``).
        num_heads, head_dim, num_layers: plain ints of the model shape (≥ 1).
        include_backward: add the backward FLOPs.
        backward_factor: backward FLOPs / forward FLOPs (≥ 0).

    Returns:
        FLOPs: a Python int for an int input (exact when ``backward_factor`` is an integer,
        otherwise rounded), a float64 tensor of the same shape for a tensor input (no overflow
        of int64 at large counts).
    """
    for name, value in (("num_heads", num_heads), ("head_dim", head_dim), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"attention_pairs_to_flops: {name} must be an int >= 1, got {value!r}")
    if backward_factor < 0:
        raise ValueError(f"attention_pairs_to_flops: backward_factor must be >= 0, got {backward_factor}")
    per_pair_forward = 4 * head_dim * num_heads * num_layers
    factor = 1 + backward_factor if include_backward else 1
    if isinstance(pairs, torch.Tensor):
        if pairs.dtype.is_floating_point or pairs.dtype.is_complex:
            raise ValueError(f"attention_pairs_to_flops: pairs must be an integer tensor, got {pairs.dtype}")
        return pairs.to(torch.float64) * float(per_pair_forward) * float(factor)
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise ValueError(
            f"attention_pairs_to_flops: pairs must be an int >= 0 or an int tensor, got {pairs!r}"
        )
    if float(factor).is_integer():
        return pairs * per_pair_forward * int(factor)
    return round(pairs * per_pair_forward * factor)
