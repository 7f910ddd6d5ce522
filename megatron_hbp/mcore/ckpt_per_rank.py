"""The ``per_rank`` checkpoint format (``checkpoint.format: per_rank``, the fallback beside
``torch_dist``): each rank's model/optimizer ``state_dict`` in its own weights-only file, and with
Megatron's distributed optimizer the sharded Adam states gathered to data-parallel rank 0 of each
(TP, PP) slice (``get_parameter_state_dp_zero``) and scattered back on load
(``load_parameter_state_from_dp_zero``). A different TP size with the plain optimizer is re-split
on load (``ckpt_reshard``)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_hbp.checkpoint_files import CheckpointCorruptError, safe_load


def rank_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def require_groups(groups, why: str):
    if groups is None:
        raise ValueError(
            f"{why} needs this rank's place in the job: pass groups= (megatron_hbp.mcore.parallel)"
        )
    return groups


def dist_opt_name(groups) -> str:
    g = require_groups(groups, "the distributed-optimizer state file")
    return f"dist_opt_tp{g.tp_rank}_pp{g.pp_rank}.pt"


def _chained(optimizer) -> list:
    return getattr(optimizer, "chained_optimizers", None) or [optimizer]


def dist_opt_writer(optimizer) -> bool:
    """Whether this rank writes its slice's distributed-optimizer file (data-parallel rank 0)."""
    return any(
        getattr(o, "data_parallel_group", None) is not None and o.data_parallel_group.rank() == 0
        for o in _chained(optimizer)
    )


def _inner_torch_optimizers(optimizer) -> list:
    return [o.optimizer for o in _chained(optimizer) if hasattr(o, "optimizer")]


def load_dist_opt_state(optimizer, loaded) -> None:
    """Megatron's ``load_parameter_state`` from the weights-only ``loaded`` file content (held by
    data-parallel rank 0, None elsewhere; Megatron scatters it), with two Megatron 0.19.2 quirks of
    the non-TE (torch Adam) path worked around: it copies into every tensor of a param's state,
    including the ``step`` tensor the file does not hold (KeyError), and ``load_state_dict`` gave
    every param the SAME ``step`` tensor (torch's Adam increments it in place once per param)."""
    inner = _inner_torch_optimizers(optimizer)
    steps = []
    for opt in inner:
        for st in opt.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                steps.append((st, st["step"].detach().clone()))
                st["step"] = float(st["step"])
    chained = _chained(optimizer)
    states = None if loaded is None else ([loaded] if len(chained) == 1 else loaded)
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        for idx, opt in enumerate(chained):
            if hasattr(opt, "load_parameter_state_from_dp_zero"):
                opt.load_parameter_state_from_dp_zero(states[idx] if states else None)
    for st, step in steps:
        st["step"] = step.clone()


def read_per_rank(
    path: Path, rank: int, saved_meta: dict, *, tp_now, model, optimizer, groups, distributed_optimizer: bool
):
    """``(this rank's state, its distributed-optimizer file content or None)`` from a per_rank step
    folder; re-split from the saved ranks when the TP size changed."""
    tp_saved = saved_meta.get("tp")
    f = path / rank_name(rank)
    if tp_saved != tp_now:
        state = _read_resharded(
            path, saved_meta, tp_now=tp_now, model=model, optimizer=optimizer, groups=groups
        )
    elif not f.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no file for rank {rank} ({f.name})")
    else:
        state = safe_load(f)
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "rng", "steps_done"} <= set(
        state
    ):
        raise CheckpointCorruptError(f"{f}: not a megatron-hbp rank checkpoint (keys missing)")
    dopt = None
    if distributed_optimizer and dist_opt_writer(optimizer):
        g = path / dist_opt_name(groups)
        if not g.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no distributed-optimizer state {g.name}")
        dopt = safe_load(g)
    return state, dopt


def _read_resharded(path: Path, saved_meta: dict, *, tp_now, model, optimizer, groups):
    from megatron_hbp.configio import from_dict
    from megatron_hbp.mcore.ckpt_reshard import reshard_states, saved_ranks
    from megatron_hbp.model_config import ModelConfig

    tp_saved = saved_meta.get("tp")
    me = require_groups(groups, f"resharding checkpoint {path} from tp={tp_saved}")
    files = [path / rank_name(r) for r in saved_ranks(me.dp_rank, tp_saved)]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
    states = [safe_load(f) for f in files]
    cfg = from_dict(ModelConfig, saved_meta["model"], str(path / "meta.json"))
    return reshard_states(states, cfg=cfg, tp=tp_now, tp_rank=me.tp_rank, model=model, optimizer=optimizer)
