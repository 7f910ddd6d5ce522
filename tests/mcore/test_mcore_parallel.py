"""``megatron_hbp.mcore.parallel.ParallelGroups``: this rank's place in the job, read once from
Megatron's ``parallel_state`` (real gloo groups, 2 processes; expectations by hand from
Megatron's default order: TP innermost, then data x context, then PP)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_ranks


def _worker(rank: int, world: int) -> dict:
    """One rank (launched by ``tests.distributed.run_ranks``): the groups for three layouts in turn."""
    import torch.distributed as dist

    from megatron_hbp.mcore.parallel import init_model_parallel
    from megatron_hbp.mcore.shim import install_cpu_shim

    torch.set_num_threads(1)
    if not torch.cuda.is_available():
        install_cpu_shim()  # Megatron's RNG tracker seeds "CUDA" generators
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    try:
        for tp, degrees in ((1, [1, 2]), (2, [1]), (1, [1])):  # sizes change: the groups are replaced
            g = init_model_parallel(tp, 1, seed=7, cp_degrees=degrees)
            out[f"tp{tp}_cp{'_'.join(map(str, degrees))}"] = {
                "fields": [g.rank, g.world, g.tp, g.pp, g.dp, g.tp_rank, g.pp_rank, g.dp_rank],
                "stages": [g.is_first_stage, g.is_last_stage, g.is_logger],
                "tp_group": None if g.tp_group is None else dist.get_process_group_ranks(g.tp_group),
                "cp1": g.cp_group(1),
                "cp2": None if 2 not in degrees else dist.get_process_group_ranks(g.cp_group(2)),
                "has_cp_groups": g.cp_groups is not None,
            }
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return out


@pytest.mark.slow
def test_parallel_groups_two_processes():
    res = run_ranks(2, _worker, timeout=300)
    for r in range(2):
        dp2 = res[r]["tp1_cp1_2"]  # tp 1: two data x context ranks, one CP-2 group over both
        assert dp2["fields"] == [r, 2, 1, 1, 2, 0, 0, r]
        assert dp2["stages"] == [True, True, r == 0]
        assert dp2["tp_group"] is None and dp2["cp1"] is None
        assert dp2["cp2"] == [0, 1] and dp2["has_cp_groups"]
        tp2 = res[r]["tp2_cp1"]  # tp 2: one data rank, both ranks share the TP group
        assert tp2["fields"] == [r, 2, 2, 1, 1, r, 0, 0]
        assert tp2["tp_group"] == [0, 1]
        assert not tp2["has_cp_groups"]
        back = res[r]["tp1_cp1"]
        assert back["fields"] == [r, 2, 1, 1, 2, 0, 0, r] and back["tp_group"] is None


def test_checkpoint_asks_for_groups_where_it_needs_a_rank():
    from megatron_hbp.mcore import ckpt_per_rank as ckpt
    from megatron_hbp.mcore.parallel import ParallelGroups

    with pytest.raises(ValueError, match=r"distributed-optimizer state file .* pass groups="):
        ckpt.dist_opt_name(None)
    g = ParallelGroups(rank=3, world=4, tp=2, pp=2, dp=1, tp_rank=1, pp_rank=1, dp_rank=0)
    assert ckpt.dist_opt_name(g) == "dist_opt_tp1_pp1.pt"
    assert (g.is_first_stage, g.is_last_stage, g.is_logger) == (False, True, True)
