"""Process groups for every CP degree of a plan, created once at start (HBP.md 3.3 "adaptive CP").

Rank layout follows Megatron-Core's ``RankGenerator`` order ``"tp-cp-ep-dp-pp"`` (dense
models, ep = 1): tensor-parallel ranks are fastest, then the data×context ("DP×CP")
dimension, then pipeline stages::

    global_rank = tp_rank + tp * j + tp * D * pp_rank,   j in [0, D),  D = world / (tp * pp)

``j`` is the rank's index in the DP×CP dimension. For CP degree ``c`` that dimension is cut
into ``D / c`` replicas of ``c`` consecutive ``j`` (replica ``j // c``, CP rank ``j % c``),
which is exactly Megatron's CP group when it is initialised with ``context_parallel_size=c``.
Consecutive ranks keep a CP group inside one node's NVLink domain when it fits.
Gradients are always reduced over the whole DP×CP dimension (``dp_cp_group``), whatever the
step's degree, so every rank holds the same weights.

The pure functions :func:`cp_group_ranks` and :func:`dp_cp_group_ranks` give the layout
without a process group (tests compare them with Megatron's ``RankGenerator``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.distributed as dist

__all__ = ["CPGroups", "build_cp_groups", "cp_group_ranks", "dp_cp_group_ranks"]


def _check_sizes(world_size: int, tp: int, pp: int) -> int:
    for name, v in (("world_size", world_size), ("tp", tp), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}: launch a multiple of "
            f"{tp * pp} processes or change the parallel sizes"
        )
    return world_size // (tp * pp)


def _check_degree(c: int, dp_cp: int) -> None:
    if not isinstance(c, int) or isinstance(c, bool) or c < 1:
        raise ValueError(f"CP degree must be a positive int, got {c!r}")
    if dp_cp % c:
        raise ValueError(
            f"CP degree {c} does not divide the data x context parallel size {dp_cp} "
            f"(= world / (tp*pp)): use degrees that divide {dp_cp}, or launch a multiple of {c} ranks per TP x PP slice"
        )


def dp_cp_group_ranks(world_size: int, *, tp: int = 1, pp: int = 1) -> list[list[int]]:
    """All DP×CP groups (one per (pp_rank, tp_rank), in that creation order) as global ranks."""
    d = _check_sizes(world_size, tp, pp)
    return [[t + tp * j + tp * d * p for j in range(d)] for p in range(pp) for t in range(tp)]


def cp_group_ranks(world_size: int, degree: int, *, tp: int = 1, pp: int = 1) -> list[list[int]]:
    """All CP groups of degree ``degree`` as global ranks, in creation order (pp, tp, replica)."""
    d = _check_sizes(world_size, tp, pp)
    _check_degree(degree, d)
    return [
        [t + tp * (r * degree + i) + tp * d * p for i in range(degree)]
        for p in range(pp)
        for t in range(tp)
        for r in range(d // degree)
    ]


@dataclass
class CPGroups:
    """The process groups of every CP degree, for this rank. Build with :func:`build_cp_groups`."""

    degrees: tuple[int, ...]
    """Sorted unique CP degrees the groups exist for."""
    tp: int
    pp: int
    dp_cp_size: int
    """Size of the data x context parallel dimension, world / (tp * pp)."""
    dp_cp_rank: int
    """This rank's index ``j`` in the DP x CP dimension."""
    dp_cp_group: dist.ProcessGroup
    """All DP x CP ranks sharing this rank's (tp_rank, pp_rank): gradients are reduced over it."""
    _groups: dict[int, dist.ProcessGroup] = field(repr=False)

    def _check(self, c: int) -> None:
        if c not in self._groups:
            raise KeyError(
                f"no CP group of degree {c}: groups were built for degrees {list(self.degrees)}; "
                f"pass every degree of the plan to build_cp_groups"
            )

    def cp_group(self, c: int) -> dist.ProcessGroup:
        """The process group of this rank's CP degree-``c`` replica (``c`` consecutive DP×CP ranks)."""
        self._check(c)
        return self._groups[c]

    def cp_rank(self, c: int) -> int:
        """This rank's index inside its degree-``c`` CP group (which chunks of each document it keeps)."""
        self._check(c)
        return self.dp_cp_rank % c

    def replica_index(self, c: int) -> int:
        """Which of the ``dp_cp_size / c`` replicas of a degree-``c`` step this rank belongs to."""
        self._check(c)
        return self.dp_cp_rank // c

    def num_replicas(self, c: int) -> int:
        """Number of replicas (CP groups) in a degree-``c`` step: ``dp_cp_size / c``."""
        self._check(c)
        return self.dp_cp_size // c


def build_cp_groups(cp_degrees: Iterable[int], *, tp: int = 1, pp: int = 1) -> CPGroups:
    """Create the CP groups of every degree in ``cp_degrees`` and the DP×CP group.

    Collective: call once after ``init_process_group`` on ALL ranks with the same arguments
    (``new_group`` is collective; every rank creates every group in the same order).
    Raises ``ValueError`` when a degree does not divide ``world / (tp * pp)``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("build_cp_groups needs torch.distributed initialised (init_process_group) first")
    degrees = tuple(sorted(set(int(c) for c in cp_degrees)))
    if not degrees:
        raise ValueError("cp_degrees is empty: pass the CP degree of every plan group, e.g. [1, 2]")
    world, rank = dist.get_world_size(), dist.get_rank()
    d = _check_sizes(world, tp, pp)
    for c in degrees:
        _check_degree(c, d)
    tp_rank, j, pp_rank = rank % tp, (rank // tp) % d, rank // (tp * d)

    by_ranks: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def create(ranks_list: list[list[int]]) -> dist.ProcessGroup:
        mine = None
        for ranks in ranks_list:
            key = tuple(ranks)
            if key not in by_ranks:  # the same rank set is one group (e.g. c == D reuses DP×CP)
                g = dist.new_group(ranks)
                if rank in ranks:
                    by_ranks[key] = g
                else:
                    by_ranks[key] = None  # type: ignore[assignment]
            if rank in ranks:
                mine = by_ranks[key]
        assert mine is not None
        return mine

    dp_cp = create(dp_cp_group_ranks(world, tp=tp, pp=pp))
    groups = {c: create(cp_group_ranks(world, c, tp=tp, pp=pp)) for c in degrees}
    # Sanity: our index j is what the group itself reports.
    assert dist.get_rank(dp_cp) == j, (dist.get_rank(dp_cp), j, tp_rank, pp_rank)
    return CPGroups(
        degrees=degrees, tp=tp, pp=pp, dp_cp_size=d, dp_cp_rank=j, dp_cp_group=dp_cp, _groups=groups
    )
