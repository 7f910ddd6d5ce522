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

Layout (one op, one folder): ``kernel.py`` the Triton kernel (one lane per pack, a loop over
document slots; GPU-verified) and its launcher, ``reference.py`` the PyTorch implementation
that is also the CPU fallback (chunked over documents, so memory stays bounded),
``validate.py`` the argument checks, ``flops.py`` :func:`attention_pairs_to_flops` (pairs to
FLOPs for a model shape), and here the public :func:`attention_cost`. No autograd: the result
is an integer count.
"""

from __future__ import annotations

import torch

from ..utils import resolve_backend
from .flops import attention_pairs_to_flops
from .kernel import _attention_cost_triton
from .reference import attention_cost_reference
from .validate import _validate

__all__ = ["attention_cost", "attention_cost_reference", "attention_pairs_to_flops"]


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
