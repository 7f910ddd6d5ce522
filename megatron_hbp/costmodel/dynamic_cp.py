"""Megatron-Core's hybrid ("dynamic") context-parallel scheduler, re-implemented in plain Python.

Followed line by line from megatron-core 0.19.2
``megatron/core/pipeline_parallel/hybrid_cp_schedule.py`` (``BalancedCPScheduler``) and
``megatron/core/datasets/data_schedule.py`` (``HybridCPDataLoaderWrapper``), minus torch and
process groups. The scheduler file is byte-identical in NVIDIA/Megatron-LM at commit
d98e8a64ddf34856e74b24714e3bedb2f5a39553 (2026-08-22), i.e. this is still the current hybrid-CP
path; Megatron-LM's newer sequence-packing scheduler (static CP) is ``dynamic_cp_upstream.py``.
What it does:

1. Every step, the sub-samples (documents) of the whole global batch are gathered from all DP
   ranks and sorted by length, longest first.
2. Each sub-sample of length l needs ``cp(l) = max(1, 2**ceil(log2(l / max_seqlen_per_rank)))``
   GPUs; its workload estimate is ``l**2 / cp(l)``.
3. ``next_hdp_group`` fills one "group": buckets of about equal work (one per distinct CP size),
   each sub-sample goes to an existing CP group of its size with the lowest load or to the
   least-loaded free GPUs; the group closes when loads are within 5 % after the CP size has
   dropped; overloaded tails are trimmed back into the leftovers; GPUs left empty get work
   by doubling the CP size of the smallest groups (``fill_empty_gpus``).
4. Groups run one after another with a barrier between them; inside a group every GPU runs its
   sub-samples one at a time, **each sub-sample its own micro-batch** (``forward_step`` per
   sub-sample in ``hybrid_context_parallel_forward_backward``) with CP size = the number of
   GPUs that hold it.

``schedule_step(seqlens, max_seqlen_per_rank, total_gpus)`` returns, per group, per GPU, the
list of (sample position, cp size) it runs. The quirks of the original are kept on purpose
(e.g. ``make_buckets_equal`` closes buckets at 1.1 x target; ``trim_overload`` only pops the
most recent sub-sample of the most loaded GPU).
"""

from __future__ import annotations

import heapq
from collections import deque
from functools import lru_cache
from math import ceil, log2


class BalancedCPScheduler:
    """Port of ``megatron.core.pipeline_parallel.hybrid_cp_schedule.BalancedCPScheduler``."""

    def __init__(self, max_seq_len_per_rank: int, total_gpus: int, linear_coef: float = 0.0):
        if max_seq_len_per_rank < 1 or total_gpus < 1:
            raise ValueError("max_seq_len_per_rank and total_gpus must be >= 1")
        self.linear_coef = float(linear_coef)  # 0 = Megatron's l^2 / cp; > 0 = our what-if (a l + l^2) / cp
        self.max_seq_len_per_rank = int(max_seq_len_per_rank)
        self.total_hdp_gpus = int(total_gpus)
        self.gpus_needed = lru_cache(maxsize=None)(self._gpus_needed)
        self.get_total_workload = lru_cache(maxsize=None)(self._get_total_workload)

    def _gpus_needed(self, seq_len: int) -> int:
        return max(1, 2 ** ceil(log2(seq_len / self.max_seq_len_per_rank)))

    def _get_total_workload(self, seq_length: int, cp_size: int | None = None) -> float:
        if cp_size is None:
            cp_size = self.gpus_needed(seq_length)
        return (self.linear_coef * seq_length + seq_length * seq_length) / cp_size

    def make_buckets_equal(self, sample_seqlens, compute_estimator):
        seqlens = [seq_len for _, seq_len in sample_seqlens]
        k = len({self.gpus_needed(L) for L in seqlens})
        work = [compute_estimator(s, self.gpus_needed(s)) for _, s in sample_seqlens]
        total_work = sum(work)
        target = total_work / k
        buckets, cur, cur_work = [], [], 0.0
        remaining_k = k
        n = len(sample_seqlens)
        for i, (sample_id, seq_len) in enumerate(sample_seqlens):
            w = compute_estimator(seq_len)
            projected = cur_work + w
            if cur and (projected > target * 1.1 or n - i <= remaining_k - len(buckets)):
                buckets.append(deque(cur))
                cur, cur_work = [], 0.0
                remaining_k -= 1
            cur.append((sample_id, seq_len))
            cur_work += w
        if cur:
            buckets.append(deque(cur))
        return buckets

    def next_hdp_group(self, sample_seqlens, compute_estimator, total_gpus, delta=0.05):
        if not sample_seqlens:
            return [[] for _ in range(total_gpus)], [], [0.0] * total_gpus, [[] for _ in range(total_gpus)]
        buckets = self.make_buckets_equal(sample_seqlens, compute_estimator)
        micro_batches = [[] for _ in range(total_gpus)]
        exec_times = [0.0] * total_gpus
        sample_ids_per_gpu = [[] for _ in range(total_gpus)]
        gpu_group_id = [None] * total_gpus
        group_members: dict[int, list[int]] = {}
        group_size: dict[int, int] = {}
        # Within one call every GPU starts idle and all members of a group receive the same work,
        # so (a) free GPUs are always the suffix [free_start, total_gpus) (the original picks the
        # free GPUs with the lowest exec time, all 0, in index order) and (b) a group's load is
        # any member's exec time. A heap per CP size of (load, gid) then finds the original's
        # min(...) over groups of that size (ties -> earliest gid) without scanning every group.
        free_start = 0
        heaps: dict[int, list[tuple[float, int]]] = {}
        group_load: dict[int, float] = {}
        next_gid = 0
        prev_needed = None
        check_balance = False
        while buckets:
            sample_seq_tuple = bucket_idx = None
            for idx in range(len(buckets)):
                if not buckets[idx]:
                    continue
                cand_tuple = buckets[idx][0]
                needed = self.gpus_needed(cand_tuple[1])
                if heaps.get(needed) or total_gpus - free_start >= needed:
                    sample_seq_tuple, bucket_idx = cand_tuple, idx
                    break
            if sample_seq_tuple is None:
                break
            sample_id, seq_len = sample_seq_tuple
            needed = self.gpus_needed(seq_len)
            if prev_needed is None:
                prev_needed = needed
            heap = heaps.setdefault(needed, [])
            while heap and heap[0][0] != group_load[heap[0][1]]:
                heapq.heappop(heap)  # stale entry
            best_gid, best_load = (heap[0][1], heap[0][0]) if heap else (None, float("inf"))
            if total_gpus - free_start >= needed and best_load > 0.0:
                best_gid = next_gid
                next_gid += 1
                members = list(range(free_start, free_start + needed))
                free_start += needed
                group_members[best_gid] = members
                group_size[best_gid] = needed
                group_load[best_gid] = 0.0
                for r in members:
                    gpu_group_id[r] = best_gid
            members = group_members[best_gid]
            per_gpu_cost = compute_estimator(seq_len)
            for r in members:
                micro_batches[r].append(seq_len)
                exec_times[r] += per_gpu_cost
                sample_ids_per_gpu[r].append(sample_id)
            group_load[best_gid] = exec_times[members[0]]
            heapq.heappush(heap, (group_load[best_gid], best_gid))
            buckets[bucket_idx].popleft()
            while buckets and not buckets[0]:
                buckets.pop(0)
            if needed < prev_needed:
                check_balance = True
            if check_balance and buckets:
                mx = max(exec_times)
                if mx - min(exec_times) <= delta * mx:
                    break

        leftovers = [t for b in buckets for t in b]

        # trim_overload
        while True:
            cur_max, cur_min = max(exec_times), min(exec_times)
            cur_slack = cur_max - cur_min
            if cur_slack <= delta * cur_max or cur_min == 0:
                break
            max_r = exec_times.index(cur_max)
            gid = gpu_group_id[max_r]
            members = group_members[gid]
            if not micro_batches[max_r] or len(micro_batches[max_r]) <= 1:
                break
            seq = micro_batches[max_r][-1]
            per_gpu_cost = compute_estimator(seq)
            proj = exec_times[:]
            for r in members:
                proj[r] -= per_gpu_cost
            if max(proj) - min(proj) < cur_slack:
                sid = sample_ids_per_gpu[max_r][-1]
                for r in members:
                    micro_batches[r].pop()
                    exec_times[r] -= per_gpu_cost
                    sample_ids_per_gpu[r].pop()
                leftovers.append((sid, seq))
            else:
                break

        # fill_empty_gpus: double the CP size of the first smallest group until no GPU is idle
        total_before = sum(len(mb) for mb in micro_batches)
        while any(not mb for mb in micro_batches):
            if not group_size:
                raise RuntimeError("dynamic CP: no group to expand; increase max_seqlen_per_rank")
            min_group_size = min(group_size.values())
            next_power = min(min_group_size * 2, total_gpus)
            gid = next(g for g, sz in group_size.items() if sz == min_group_size)
            members = group_members[gid]
            needed_count = next_power - min_group_size
            start, end = members[0], members[-1]
            empty_gpu = next(i for i, w in enumerate(micro_batches) if not w)
            work_to_push = micro_batches[end + 1 : empty_gpu]
            times_to_push = exec_times[end + 1 : empty_gpu]
            ids_to_push = sample_ids_per_gpu[end + 1 : empty_gpu]
            new_mb = [[] for _ in range(total_gpus)]
            new_t = [0.0] * total_gpus
            new_ids = [[] for _ in range(total_gpus)]
            for i in range(start):
                new_mb[i], new_t[i], new_ids[i] = micro_batches[i], exec_times[i], sample_ids_per_gpu[i]
            for i in range(start, end + needed_count + 1):
                new_mb[i] = micro_batches[end]
                new_t[i] = self.get_total_workload(micro_batches[end][0], next_power)
                new_ids[i] = sample_ids_per_gpu[end]
            for i, w in enumerate(work_to_push):
                j = end + needed_count + 1 + i
                new_mb[j], new_t[j], new_ids[j] = w, times_to_push[i], ids_to_push[i]
            group_size[gid] = next_power
            group_members[gid] = list(range(start, end + needed_count + 1))
            for pushed in group_size:
                if pushed > gid:
                    group_members[pushed] = [x + needed_count for x in group_members[pushed]]
            micro_batches, exec_times, sample_ids_per_gpu = new_mb, new_t, new_ids
        if sum(len(mb) for mb in micro_batches) < total_before:
            raise RuntimeError(
                "dynamic CP: samples were lost while filling empty GPUs (as asserted upstream)"
            )
        return micro_batches, leftovers, exec_times, sample_ids_per_gpu

    def get_groups_and_subsamples(self, sample_id_seqlens):
        """All groups of one step: (groups of per-GPU seqlens, groups of per-GPU sample ids)."""
        groups, sample_id_groups = [], []
        sample_id_seqlens = sorted(sample_id_seqlens, key=lambda x: x[1], reverse=True)
        while sample_id_seqlens:
            mb, sample_id_seqlens, _, sample_ids = self.next_hdp_group(
                sample_id_seqlens, self.get_total_workload, self.total_hdp_gpus
            )
            groups.append(mb)
            sample_id_groups.append(sample_ids)
        return groups, sample_id_groups


def schedule_step(
    seqlens, max_seqlen_per_rank: int, total_gpus: int, linear_coef: float = 0.0
) -> list[list[list[tuple[int, int]]]]:
    """Schedule one global batch: ``[group][gpu] -> [(sample position, cp size), ...]``.

    ``seqlens``: lengths of the step's sub-samples (positions index into it). The cp size of a
    sub-sample in a group is the number of GPUs of that group that hold it (as Megatron's
    ``_get_new_data_iterator`` computes ``partner_cp_size``). ``linear_coef`` > 0 replaces the l^2
    workload estimate by (linear_coef l + l^2) -- a what-if, not Megatron's behaviour."""
    sched = BalancedCPScheduler(max_seqlen_per_rank, total_gpus, linear_coef)
    items = [(i, int(s)) for i, s in enumerate(seqlens) if int(s) > 0]
    too_big = [s for _, s in items if sched.gpus_needed(s) > total_gpus]
    if too_big:
        raise ValueError(
            f"dynamic CP: a sample of {max(too_big)} tokens needs more than {total_gpus} GPUs at "
            f"max_seqlen_per_rank={max_seqlen_per_rank}; raise max_seqlen_per_rank"
        )
    _, id_groups = sched.get_groups_and_subsamples(items)
    out = []
    for ids in id_groups:
        count: dict[int, int] = {}
        for gpu_ids in ids:
            for sid in gpu_ids:
                count[sid] = count.get(sid, 0) + 1
        out.append([[(sid, count[sid]) for sid in gpu_ids] for gpu_ids in ids])
    return out
