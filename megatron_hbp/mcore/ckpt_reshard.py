"""Resume a checkpoint at another tensor-parallel size (same PP, same data x context ranks).

The rank files of one data-parallel replica hold the TP shards of every tensor; the model weights
and Adam's ``exp_avg`` / ``exp_avg_sq`` (elementwise, so sharded like their parameter) are merged
and re-split with the converter's layout rules (``megatron_hbp.convert.mapping``: fused QKV by
query group, gate/up halves of ``linear_fc1``, row / column / vocab splits; norms replicated).
Supported for the plain fp32 optimizer (``optimizer.use_distributed_optimizer: false``); the
distributed optimizer's flat buffers and the bf16 optimizer's fp32 master copies are refused
before anything is loaded. Padded vocabulary rows (when ``vocab_size`` is not a multiple of
128 x TP) restart at zero. The RNG states come from the replica's first TP rank; Megatron's
model-parallel RNG of a TP rank that did not exist in the checkpoint keeps its fresh seed.
"""

from __future__ import annotations

import torch

from megatron_hbp.checkpoint_files import CheckpointMismatchError
from megatron_hbp.convert.mapping import tensor_maps, to_hf, to_megatron


class ReshardError(CheckpointMismatchError):
    """The checkpoint cannot be re-split to this layout (the message says why)."""


def saved_ranks(dp_rank: int, tp_saved: int) -> list[int]:
    """Global ranks of the checkpoint's TP shards of data-parallel replica ``dp_rank`` (pp = 1:
    Megatron's default order puts TP fastest)."""
    return [dp_rank * tp_saved + k for k in range(tp_saved)]


def _reshard(name: str, shards: list[torch.Tensor], maps: dict, cfg, tp: int, tp_rank: int, like):
    tm = maps.get(name)
    if tm is None:
        raise ReshardError(f"tensor {name} has no tensor-parallel layout rule; cannot change TP")
    padded = like.shape[0] * tp if tm.kind == "vocab" else 0
    return to_megatron(tm, to_hf(tm, shards, cfg), cfg, tp, padded)[tp_rank].clone()


def reshard_states(states: list[dict], *, cfg, tp: int, tp_rank: int, model, optimizer) -> dict:
    """One rank file's content for TP rank ``tp_rank`` of ``tp`` from ``states`` (the saved TP
    shards of this rank's replica, TP-rank order). ``model`` / ``optimizer`` are the live ones
    (they give the target shapes and the optimizer's parameter order)."""
    first = states[0]
    opt0 = first["optimizer"]
    if not (isinstance(opt0, dict) and set(opt0) == {"state", "param_groups"}):
        raise ReshardError(
            "changing TP on resume supports the plain fp32 optimizer only (this checkpoint holds "
            f"{sorted(opt0) if isinstance(opt0, dict) else type(opt0).__name__}); resume at the saved TP"
        )
    maps = {tm.megatron: tm for tm in tensor_maps(cfg)}
    live = dict(model.state_dict())
    out_model = {}
    for key, v in first["model"].items():
        if isinstance(v, torch.Tensor) and key in live and isinstance(live[key], torch.Tensor):
            out_model[key] = _reshard(
                key, [s["model"][key] for s in states], maps, cfg, tp, tp_rank, live[key]
            )
        else:
            out_model[key] = v
    # optimizer state: index -> the parameter's name, in the live optimizer's order (the same
    # module structure gives the same order at every TP size)
    names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)
    order = [names[id(p)] for g in inner.param_groups for p in g["params"]]
    out_state = {}
    for idx, st in opt0["state"].items():
        name = order[int(idx)]
        param = live[name]
        new = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                new[k] = _reshard(
                    name, [s["optimizer"]["state"][idx][k] for s in states], maps, cfg, tp, tp_rank, param
                )
            else:
                new[k] = v
        out_state[idx] = new
    rng = dict(first["rng"])
    if tp_rank < len(states):
        rng["tracker"] = states[tp_rank]["rng"]["tracker"]
    else:
        rng.pop("tracker", None)
    return dict(
        first, model=out_model, optimizer={"state": out_state, "param_groups": opt0["param_groups"]}, rng=rng
    )
