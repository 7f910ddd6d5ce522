"""Argument checks of :func:`attention_cost` (one-line errors naming the argument and the fix)."""

from __future__ import annotations

import torch


def _max_doc_length(cp: int) -> int:
    """Longest document the kernel handles exactly: its padded length 2·cp·ceil(l/(2·cp)) must
    fit in int32 (the kernel's index math). Far above any real sequence; checked only when
    validating on the host (CUDA inputs are not checked, to avoid a sync)."""
    return 2**31 - 2 * cp


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
