"""Plan-driven data: each rank gets exactly its replica's micro-batches of every step.

The rank's place in the data x context dimension (``dp_rank``) and the step's CP degree
``c`` give its replica ``dp_rank // c`` and CP rank ``dp_rank % c`` (replica r = ranks
[r·c, (r+1)·c), the plan contract). Samples are read by index from the token files by mmap
(``TokenDataset``) or, without token files, from the JSONL (``SFTDataset``: random access by
stored byte offset, tokenised on access) and turned into packed, CP-sharded micro-batches in
background worker processes (``torch.utils.data.DataLoader`` with workers), so the
training loop only moves ready tensors to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_hbp.mcore.batch import PackedBatch, build_packed_batch


@dataclass(frozen=True)
class WorkItem:
    """One micro-batch of one rank: what a worker needs to build it (small, picklable)."""

    step: int
    micro_batch: int
    sample_indices: np.ndarray
    """int64 [n] dataset indices, all packs of the micro-batch concatenated."""
    padded_lengths: np.ndarray
    """int32 [n] padded length of each document."""
    lengths: np.ndarray
    """int32 [n] real lengths from the plan (checked against the tokenised samples)."""
    cp: int
    cp_rank: int


def rank_work_items(
    plan, dp_rank: int, start_step: int = 0, end_step: int | None = None, dp_size: int | None = None
) -> list[WorkItem]:
    """Every micro-batch of ``dp_rank`` for plan steps ``[start_step, end_step)``, in order.

    ``dp_size`` (default: the plan's world size) smaller than the plan's: the plan's replicas of a
    CP-``c`` step are dealt round-robin over the ``dp_size / c`` replica slots of the launch, so a
    rank runs the micro-batches of replicas ``dp_rank // c + j * dp_size / c`` one after another.
    """
    end_step = plan.num_steps if end_step is None else min(end_step, plan.num_steps)
    dp_size = plan.world_size if dp_size is None else dp_size
    wl = plan.workload  # the rank's packs, CP degree and padded lengths, derived once from the plan
    a = plan.arrays
    poff = np.asarray(a["pack_offsets"], dtype=np.int64)
    base = int(poff[0])
    items = []
    for s in range(start_step, end_step):
        cp = int(wl.step_cp[s])
        for m, p in enumerate(wl.rank_packs(s, dp_rank, dp_size).tolist()):
            s0, s1 = int(poff[p]), int(poff[p + 1])
            idx = np.asarray(a["samples"][s0:s1], np.int64)
            pad = np.asarray(wl.padded_lengths[s0 - base : s1 - base], np.int32)
            lens = np.asarray(a["lengths"][s0:s1], np.int32)
            items.append(WorkItem(s, m, idx, pad, lens, cp, dp_rank % cp))
    return items


class MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset over a rank's work items; ``ds[i] -> PackedBatch`` (CPU tensors)."""

    def __init__(self, items: list[WorkItem], samples, *, pad_id: int, loss_normalization: str):
        self.items = items
        self.samples = samples
        self.pad_id = pad_id
        self.loss_normalization = loss_normalization

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PackedBatch:
        item = self.items[i]
        docs = []
        for idx, n in zip(item.sample_indices.tolist(), item.lengths.tolist()):
            s = self.samples[idx]
            ids = np.asarray(s.input_ids)
            if ids.shape[0] != n:
                raise ValueError(
                    f"sample {idx}: tokenised length {ids.shape[0]} differs from the plan's {n}; the data "
                    "changed after preprocessing: rebuild the sample info and the plan"
                )
            docs.append((ids, np.asarray(s.loss_mask)))
        return build_packed_batch(
            docs,
            item.padded_lengths,
            pad_id=self.pad_id,
            loss_normalization=self.loss_normalization,
            cp=item.cp,
            cp_rank=item.cp_rank,
            sample_indices=item.sample_indices.tolist(),
        )


def _identity(x):
    return x


def make_loader(
    items: list[WorkItem],
    samples,
    *,
    pad_id: int,
    loss_normalization: str,
    num_workers: int = 2,
    prefetch_factor: int = 4,
):
    """Iterator of ``PackedBatch`` in work-item order, prepared by ``num_workers`` processes."""
    ds = MicroBatchDataset(items, samples, pad_id=pad_id, loss_normalization=loss_normalization)
    kwargs = {}
    if num_workers > 0:
        # Its own generator: starting the workers draws their base seed from it, not from the
        # global torch RNG, whose state a checkpoint restores (resume stays bitwise exact).
        kwargs = dict(
            prefetch_factor=prefetch_factor,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(0),
        )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
