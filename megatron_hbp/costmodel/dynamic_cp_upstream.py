"""Megatron-LM's current sequence-packing scheduler (``DpBalancedScheduler``), in plain Python.

Ported from NVIDIA/Megatron-LM at commit ``d98e8a64ddf34856e74b24714e3bedb2f5a39553``
(2026-08-22; the scheduler came in with a9381be "Add DP-balanced sequence-packing scheduler and
wrap_data_iterator entry point (#6684)"), not in the megatron-core 0.19.2 wheel:

- ``megatron/core/datasets/data_schedule.py``: ``BasePackingScheduler``,
  ``DpBalancedScheduler.get_groups_and_subsamples`` and ``DpBalancedScheduler.run``,
  ``wrap_data_iterator``;
- ``megatron/core/datasets/data_schedule_utils.py``: ``get_batch_and_global_seqlens``,
  ``_get_global_seqlens_and_ids``, ``build_packed_microbatches``, ``_pack_sequences``.

What upstream does every step (``DpBalancedScheduler.run``), minus torch and process groups:

1. Every DP rank pulls its ``num_microbatches`` items, unpacks them into sub-samples and the
   padded lengths (``padded_seq_len``) are all-gathered over DP, in DP-rank order: the global
   batch is a list of sub-samples in arrival order (global id = position).
2. ``get_groups_and_subsamples``: **next-fit in arrival order** (no sorting, no cost model):
   sub-sample i joins the open pack while the pack's padded tokens stay
   ``<= max_seqlen_per_dp_cp_rank * cp_size``, else it opens a new pack. (A sub-sample longer
   than that cap still opens a pack of its own; if it is the very first one, an empty pack is
   emitted before it. Both quirks are kept here.)
3. The number of packs is made a multiple of ``dp_size`` (times
   ``microbatch_group_size_per_vp_stage`` with virtual pipelining): walking back from the last
   pack, each pack with more than one sub-sample gives its last sub-sample to a new pack of its
   own appended at the end, until the count is a multiple; upstream asserts ("Not enough samples
   to move") if the walk reaches pack 0 (here: ``ValueError``).
4. Micro-batch i, DP x CP rank j runs pack ``i * dp_size + j // cp_size``: the ``cp_size``
   ranks of DP replica ``r = j // cp_size`` share one pack and split it with the model's
   **static** context-parallel size (``wrap_data_iterator``: ``cp_size = dp_cp_group.size() //
   dp_size``); ``num_micro_batches = packs / dp_size`` varies from step to step.
5. ``build_packed_microbatches``: the sub-samples of one (micro-batch, rank) are concatenated
   into a single THD micro-batch (``cu_seqlens_padded`` = cumulative padded lengths).

So each rank's sub-samples of a micro-batch are one micro-batch (unlike the hybrid-CP path,
whose ``BalancedCPScheduler`` in ``pipeline_parallel/hybrid_cp_schedule.py`` is byte-identical at
this commit to megatron-core 0.19.2, ported in ``dynamic_cp.py``, and still runs every sub-sample
as its own micro-batch), but the CP size is fixed and the packs are neither sorted nor balanced
across DP replicas.
"""

from __future__ import annotations


def pack_in_order(seqlens, max_seq_len_all_ranks: int) -> list[list[int]]:
    """Step 2 of the module docstring: ``packed_id_groups`` (positions into ``seqlens``)."""
    packed_id_groups: list[list[int]] = []
    sum_seqlen = 0
    single_microbatch: list[int] = []
    for i, seq_len in enumerate(seqlens):
        seq_len = int(seq_len)
        if sum_seqlen + seq_len <= max_seq_len_all_ranks:
            single_microbatch.append(i)
            sum_seqlen += seq_len
        else:
            packed_id_groups.append(single_microbatch)
            single_microbatch = [i]
            sum_seqlen = seq_len
    if single_microbatch:
        packed_id_groups.append(single_microbatch)
    return packed_id_groups


def align_pack_count(packed_id_groups: list[list[int]], multiple: int) -> list[list[int]]:
    """Step 3 of the module docstring, in place (and returned)."""
    num_packed_sequence = len(packed_id_groups)
    if num_packed_sequence % multiple != 0:
        num_to_move = multiple - num_packed_sequence % multiple
        i = num_packed_sequence - 1
        while num_to_move > 0:
            if not i > 0:
                raise ValueError(
                    f"upstream DpBalancedScheduler: not enough samples to move ({num_packed_sequence} packs "
                    f"cannot be split into a multiple of {multiple}; upstream asserts here)"
                )
            if len(packed_id_groups[i]) > 1:
                seq_id = packed_id_groups[i].pop()
                packed_id_groups.append([seq_id])
                num_to_move -= 1
            else:
                i -= 1
    return packed_id_groups


class DpBalancedScheduler:
    """Port of ``megatron.core.datasets.data_schedule.DpBalancedScheduler`` (scheduling part)."""

    def __init__(
        self,
        max_seqlen_per_dp_cp_rank: int,
        cp_size: int,
        dp_size: int,
        microbatch_group_size_per_vp_stage: int | None = None,
    ):
        if max_seqlen_per_dp_cp_rank < 1 or cp_size < 1 or dp_size < 1:
            raise ValueError("max_seqlen_per_dp_cp_rank, cp_size and dp_size must be >= 1")
        self.max_seqlen_per_dp_cp_rank = int(max_seqlen_per_dp_cp_rank)
        self.cp_size = int(cp_size)
        self.dp_size = int(dp_size)
        self.microbatch_group_size_per_vp_stage = microbatch_group_size_per_vp_stage
        self.max_seq_len_all_ranks = self.max_seqlen_per_dp_cp_rank * self.cp_size

    def get_groups_and_subsamples(self, sample_id_seqlens) -> list[list[list[int]]]:
        """``sample_id_groups[micro_batch][dp_cp_rank]`` = positions of the sub-samples that rank runs
        packed into that micro-batch. ``sample_id_seqlens``: ``[(global_id, padded_len), ...]`` in
        arrival order (upstream's global id is the position)."""
        packed = pack_in_order([s for _, s in sample_id_seqlens], self.max_seq_len_all_ranks)
        multiple = self.dp_size * (
            self.microbatch_group_size_per_vp_stage
            if self.microbatch_group_size_per_vp_stage is not None
            else 1
        )
        align_pack_count(packed, multiple)
        num_micro_batches = len(packed) // self.dp_size
        sample_id_groups = []
        for i in range(num_micro_batches):
            sample_id_groups.append([])
            for j in range(self.cp_size * self.dp_size):
                seq_id = int(i * self.dp_size + j / self.cp_size)
                sample_id_groups[i].append(packed[seq_id])
        return sample_id_groups


def schedule_step_upstream(
    padded_seqlens, max_seqlen_per_dp_cp_rank: int, cp_size: int, dp_size: int
) -> list[list[list[int]]]:
    """One global batch: ``[micro_batch][dp_replica] -> [positions]`` (the ``cp_size`` ranks of a
    replica hold the same pack, so one entry per replica). ``padded_seqlens``: the sub-samples'
    ``padded_seq_len`` in arrival order."""
    sched = DpBalancedScheduler(max_seqlen_per_dp_cp_rank, cp_size, dp_size)
    groups = sched.get_groups_and_subsamples(list(enumerate(int(s) for s in padded_seqlens)))
    return [[mb[r * cp_size] for r in range(dp_size)] for mb in groups]
