"""Packed THD micro-batches: plan pack(s) + tokenised samples -> tensors for one forward.

For every document of a micro-batch (in plan order):

* ``tokens``: the sample's ids, then ``pad_id`` up to the document's padded length,
* ``labels[j] = ids[j + 1]`` INSIDE the document; the last real token (and padding) has no
  label: label 0, loss mask 0 (a document never predicts the next document's first token),
* ``loss_mask[j] = sample.loss_mask[j + 1]`` (the target token is an assistant token),
* ``position_ids``: 0, 1, ... restarting at each document (RoPE),
* ``cu_seqlens`` (real) and ``cu_seqlens_padded`` (the packed layout), int32 ``[n+1]``.

Then, when the step's CP degree is > 1, each CP rank keeps its zigzag shard of every
per-token tensor (``megatron_hbp.cp.shard_for_cp``); the cu_seqlens stay global.

Loss weights implement the three normalisations (HBP.md 3.3, paper Table 10). Megatron
divides the summed ``Σ weight · token_loss`` of all micro-batches and ranks by the summed
integer ``denominator`` of the same micro-batches (``calculate_per_token_loss``):

=====================  ===================  =============================================
``loss_normalization``  weight of a token    denominator contribution
=====================  ===================  =============================================
``step_token_mean``     1                    loss tokens (on this CP rank)
``micro_batch_mean``    1 / mb loss tokens   1 per micro-batch with loss tokens (CP rank 0)
``sample_mean``         1 / sample loss tok  1 per sample with loss tokens (CP rank 0)
=====================  ===================  =============================================

``step_token_mean`` is the stable loss: Σ token losses / the step's loss tokens, whatever
the number of micro-batches, replicas or CP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOSS_NORMALIZATIONS = ("step_token_mean", "micro_batch_mean", "sample_mean")


@dataclass
class PackedBatch:
    """One micro-batch on one rank, host tensors (CPU); picklable (built in worker processes)."""

    tokens: torch.Tensor
    """int64 ``[t]`` input ids (this CP rank's shard)."""
    labels: torch.Tensor
    """int64 ``[t]`` next-token targets inside each document (0 where there is none)."""
    loss_mask: torch.Tensor
    """float32 ``[t]`` 1 where the label counts."""
    loss_weight: torch.Tensor
    """float32 ``[t]`` weight of each token's loss (0 where loss_mask is 0)."""
    position_ids: torch.Tensor
    """int64 ``[t]`` position of each token inside its document."""
    cu_seqlens: torch.Tensor
    """int32 ``[n+1]`` global real document boundaries."""
    cu_seqlens_padded: torch.Tensor
    """int32 ``[n+1]`` global padded document boundaries (the packed layout)."""
    lengths: list[int]
    """Real document lengths."""
    padded_lengths: list[int]
    """Padded document lengths (multiples of 2·cp when cp > 1)."""
    sample_indices: list[int]
    """Dataset index of each document (-1 for a padding-only filler)."""
    loss_tokens: int
    """Loss tokens of the whole micro-batch (all CP ranks)."""
    local_loss_tokens: int
    """Loss tokens on this CP rank."""
    denominator: int
    """This rank's integer contribution to the step's loss denominator (see module doc)."""
    cp: int = 1
    cp_rank: int = 0

    @property
    def num_tokens(self) -> int:
        """Real tokens of the whole micro-batch."""
        return int(sum(self.lengths))


def _fill_documents(samples, padded_lengths: list[int], *, pad_id: int, filler_only: bool):
    """``(tokens, labels, loss mask, positions, real lengths, loss tokens per document)`` of the
    documents laid out one after the other, each in its padded span."""
    total = sum(padded_lengths)
    tokens = np.full(total, pad_id, dtype=np.int64)
    labels = np.zeros(total, dtype=np.int64)
    mask = np.zeros(total, dtype=np.float32)
    positions = np.zeros(total, dtype=np.int64)
    lengths = []
    sample_loss = []
    start = 0
    for (ids, lmask), plen in zip(samples, padded_lengths):
        ids = np.asarray(ids, dtype=np.int64)
        lmask = np.asarray(lmask)
        n = ids.shape[0]
        if lmask.shape[0] != n:
            raise ValueError(f"sample has {n} ids but a loss mask of {lmask.shape[0]}")
        if plen < n:
            raise ValueError(f"padded length {plen} is shorter than the document ({n} tokens)")
        tokens[start : start + n] = ids
        labels[start : start + n - 1] = ids[1:]
        m = (lmask[1:] > 0).astype(np.float32) if not filler_only else np.zeros(max(n - 1, 0), np.float32)
        mask[start : start + n - 1] = m
        positions[start : start + plen] = np.arange(plen)
        lengths.append(n if not filler_only else 0)
        sample_loss.append(float(m.sum()))
        start += plen
    if filler_only:
        lengths = [0]
    return tokens, labels, mask, positions, lengths, sample_loss


def _loss_weights(
    mask, padded_lengths: list[int], sample_loss: list[float], loss_tokens: int, loss_normalization: str
):
    """Per-token loss weights ``[T] float32`` of ``loss_normalization``."""
    weight = np.zeros(mask.shape[0], dtype=np.float32)
    start = 0
    for plen, n_loss in zip(padded_lengths, sample_loss):
        sl = slice(start, start + plen)
        if loss_normalization == "step_token_mean":
            weight[sl] = mask[sl]
        elif loss_normalization == "micro_batch_mean" and loss_tokens:
            weight[sl] = mask[sl] / loss_tokens
        elif loss_normalization == "sample_mean" and n_loss:
            weight[sl] = mask[sl] / n_loss
        start += plen
    return weight


def _denominator(
    loss_normalization: str, local_loss: int, loss_tokens: int, sample_loss: list[float], cp_rank: int
) -> int:
    """This rank's share of the step's loss denominator (Megatron all-reduces the sum)."""
    if loss_normalization == "step_token_mean":
        return local_loss
    if loss_normalization == "micro_batch_mean":
        return int(loss_tokens > 0) if cp_rank == 0 else 0
    return sum(1 for x in sample_loss if x > 0) if cp_rank == 0 else 0


def build_packed_batch(
    samples: list[tuple[np.ndarray, np.ndarray]],
    padded_lengths: list[int] | np.ndarray,
    *,
    pad_id: int = 0,
    loss_normalization: str = "step_token_mean",
    cp: int = 1,
    cp_rank: int = 0,
    sample_indices: list[int] | None = None,
) -> PackedBatch:
    """Build one packed micro-batch.

    Args:
        samples: per document ``(input_ids int [L], loss_mask {0,1} [L])``.
        padded_lengths: per document padded length ``>= L`` (``== L`` when cp == 1).
        pad_id: id used for padding tokens (never a target).
        loss_normalization: one of ``LOSS_NORMALIZATIONS``.
        cp, cp_rank: the step's CP degree and this rank's place in its CP group.
        sample_indices: dataset indices (informational, kept in the batch).
    An empty ``samples`` gives a padding-only batch (one filler document of 2·cp tokens,
    zero loss tokens), used for the plan's padded last step.
    """
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization '{loss_normalization}' unknown; choose {LOSS_NORMALIZATIONS}")
    padded_lengths = [int(x) for x in padded_lengths]
    if len(padded_lengths) != len(samples):
        raise ValueError(f"{len(samples)} samples but {len(padded_lengths)} padded lengths")
    if sample_indices is None:
        sample_indices = list(range(len(samples)))
    sample_indices = [int(i) for i in sample_indices]
    if not samples:  # padding-only micro-batch
        filler = 2 * cp
        samples = [(np.full(filler, pad_id, dtype=np.int64), np.zeros(filler, dtype=np.uint8))]
        padded_lengths = [filler]
        sample_indices = [-1]
        filler_only = True
    else:
        filler_only = False

    tokens, labels, mask, positions, lengths, sample_loss = _fill_documents(
        samples, padded_lengths, pad_id=pad_id, filler_only=filler_only
    )
    loss_tokens = int(sum(sample_loss))
    weight = _loss_weights(mask, padded_lengths, sample_loss, loss_tokens, loss_normalization)

    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    cu_pad = np.zeros(len(padded_lengths) + 1, dtype=np.int32)
    cu_pad[1:] = np.cumsum(padded_lengths)
    if filler_only:  # the filler has no real tokens but occupies its padded span
        cu = cu_pad.copy()
        cu[1:] = 0

    t = {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "loss_weight": torch.from_numpy(weight),
        "position_ids": torch.from_numpy(positions),
    }
    if cp > 1:
        from megatron_hbp.mcore.cp_seam import shard_for_cp

        cu_pad_t = torch.from_numpy(cu_pad)
        t = {k: shard_for_cp(v, cu_pad_t, cp, cp_rank).contiguous() for k, v in t.items()}
    local_loss = int(t["loss_mask"].sum().item())
    denom = _denominator(loss_normalization, local_loss, loss_tokens, sample_loss, cp_rank)

    return PackedBatch(
        tokens=t["tokens"],
        labels=t["labels"],
        loss_mask=t["loss_mask"],
        loss_weight=t["loss_weight"],
        position_ids=t["position_ids"],
        cu_seqlens=torch.from_numpy(cu),
        cu_seqlens_padded=torch.from_numpy(cu_pad),
        lengths=lengths,
        padded_lengths=padded_lengths,
        sample_indices=sample_indices,
        loss_tokens=loss_tokens,
        local_loss_tokens=local_loss,
        denominator=denom,
        cp=cp,
        cp_rank=cp_rank,
    )


def to_model_inputs(
    batch: PackedBatch, device: torch.device | str, cp_group=None, cp_impl: str = "ulysses"
) -> dict:
    """Device tensors with a batch dimension of 1 and the ``HBPPackedSeqParams`` for the model
    (``cp_impl``: the CP attention of a CP > 1 batch, ``ulysses`` or ``allgather``)."""
    from megatron_hbp.mcore.attention import HBPPackedSeqParams

    def dev(x):
        return x.to(device, non_blocking=True)

    cu = dev(batch.cu_seqlens)
    cu_pad = dev(batch.cu_seqlens_padded)
    max_len = max(batch.padded_lengths)
    local_padded = [p // batch.cp for p in batch.padded_lengths]
    params = HBPPackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
        local_cp_size=batch.cp,
        cp_group=cp_group if batch.cp > 1 else None,
        position_ids=dev(batch.position_ids),
        padded_lengths_host=local_padded if batch.cp == 1 else list(batch.padded_lengths),
        lengths_host=list(batch.lengths),
        cu_seqlens_cpu=batch.cu_seqlens,
        cu_seqlens_padded_cpu=batch.cu_seqlens_padded,
        cp_impl=cp_impl,
    )
    return {
        "tokens": dev(batch.tokens)[None],
        "labels": dev(batch.labels)[None],
        "loss_mask": dev(batch.loss_mask)[None],
        "loss_weight": dev(batch.loss_weight)[None],
        "packed_seq_params": params,
        "denominator": batch.denominator,
        "local_loss_tokens": batch.local_loss_tokens,
    }
