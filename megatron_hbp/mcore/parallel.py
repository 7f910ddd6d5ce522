"""This rank's place in the job, read from Megatron's ``parallel_state`` in one place.

Megatron-Core keeps its process groups in module globals (``megatron.core.parallel_state``).
The trainer reads them once, right after :func:`init_model_parallel`, into a frozen
:class:`ParallelGroups` that the step, loop, loss, metrics and checkpoint code receive as an
argument. This module is the only one in ``megatron_hbp`` that touches ``parallel_state``
(``tests/mcore/test_trainer_layout.py`` fails on any other use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_hbp.mcore.cp_seam import build_cp_groups


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's coordinates and the groups the trainer talks over (Megatron's default order:
    TP innermost, then data x context, then PP)."""

    rank: int
    """Global rank."""
    world: int
    """Processes in the job (tp x pp x dp)."""
    tp: int
    pp: int
    dp: int
    """Data x context ranks (``world / (tp * pp)``); a step's CP groups split them."""
    tp_rank: int
    pp_rank: int
    dp_rank: int
    """Rank among the data x context ranks (Megatron's data-parallel rank)."""
    tp_group: object = None
    """The tensor-parallel ``ProcessGroup`` when ``tp > 1`` (the fused loss reduces over it), else None."""
    cp_groups: object = None
    """``megatron_hbp.cp.CPGroups`` of the plan's CP degrees when any is > 1, else None."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """The rank that writes the metrics: the last pipeline stage holds the loss."""
        return self.rank == self.world - 1 if self.pp > 1 else self.rank == 0

    def cp_group(self, cp: int):
        """This rank's CP group of degree ``cp`` (None for ``cp == 1``)."""
        return self.cp_groups.cp_group(cp) if cp > 1 else None


def ensure_model_parallel(tp: int, pp: int, *, keep_other_sizes: bool = False) -> None:
    """Initialise Megatron's model-parallel groups for ``tp`` x ``pp`` (torch.distributed must be up).

    Groups of an earlier run in this process are reused when their sizes match, and replaced
    otherwise -- or, with ``keep_other_sizes`` (the profiler), kept whatever their sizes.
    """
    if (
        not keep_other_sizes
        and parallel_state.model_parallel_is_initialized()
        and (
            parallel_state.get_tensor_model_parallel_world_size() != tp
            or parallel_state.get_pipeline_model_parallel_world_size() != pp
        )
    ):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, pp)


def init_model_parallel(tp: int, pp: int, *, seed: int, cp_degrees=()) -> ParallelGroups:
    """The trainer's process groups: Megatron's ``tp`` x ``pp`` groups (reused from an earlier run
    of the same sizes), its model-parallel RNG tracker seeded with ``seed``, and the CP groups of
    every degree > 1 in ``cp_degrees`` (collective: all ranks call it with the same arguments)."""
    ensure_model_parallel(tp, pp)
    seed_model_parallel_rng(seed)
    degrees = sorted({int(c) for c in cp_degrees})
    cp_groups = build_cp_groups(degrees, tp=tp, pp=pp) if any(c > 1 for c in degrees) else None
    return current_groups(cp_groups=cp_groups)


def seed_model_parallel_rng(seed: int) -> None:
    """Megatron's CUDA RNG tracker (model-parallel and data-parallel streams) from ``seed``."""
    model_parallel_cuda_manual_seed(seed)


def current_groups(*, cp_groups=None) -> ParallelGroups:
    """A :class:`ParallelGroups` of the groups Megatron holds now (after :func:`ensure_model_parallel`)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    world = torch.distributed.get_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    return ParallelGroups(
        rank=torch.distributed.get_rank(),
        world=world,
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=tp_group if tp_group is not None and tp_group.size() > 1 else None,
        cp_groups=cp_groups,
    )
