"""Checkpoints: one ``torch.save`` file per rank plus a JSON manifest.

Layout: ``<dir>/step_<N>/rank_<RRRRR>.pt`` + ``<dir>/step_<N>/meta.json`` and
``<dir>/latest`` (text: ``step_<N>``). ``N`` is the number of plan steps done, so a resume
continues with plan step ``N``.

Why not Megatron's distributed checkpointing: it needs ``sharded_state_dict`` support from
every module in the local spec plus a storage backend; per-rank ``torch.save`` is exact,
simple and enough for resuming with the same parallel layout (the layout is part of the
manifest and checked). A rank file holds the model and optimizer state dicts, the LR
scheduler, every RNG state (torch CPU/CUDA, Python, NumPy, Megatron's tracker) and the
plan position. With Megatron's distributed optimizer the sharded Adam states are gathered
to data-parallel rank 0 of each (TP, PP) slice with ``save_parameter_state`` into
``dist_opt_tp<T>_pp<P>.pt`` and scattered back with ``load_parameter_state``.

``--load`` refuses a checkpoint made from a different plan (plan hash), model config, or
parallel layout, with a message naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was made for another plan, model or parallel layout."""


def plan_hash(plan) -> str:
    """sha256 of the plan's content: its config and every array (steps, packs, sample indices)."""
    from megatron_hbp.configio import to_dict

    h = hashlib.sha256(json.dumps(to_dict(plan.config), sort_keys=True).encode())
    for key in sorted(plan.arrays):
        arr = np.ascontiguousarray(plan.arrays[key])
        h.update(f"|{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _rng_states() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the legacy global state is what we restore
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_states(states: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    get_cuda_rng_tracker().set_states(states["tracker"])


def _dist_opt_file(out: Path) -> Path:
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_rank()
    return out / f"dist_opt_tp{tp}_pp{pp}.pt"


def save_checkpoint(
    directory,
    steps_done: int,
    *,
    rank: int,
    model,
    optimizer,
    scheduler,
    meta: dict,
    distributed_optimizer=False,
) -> Path:
    """Write this rank's file (every rank calls it); rank 0 writes the manifest and ``latest``."""
    directory = Path(directory)
    out = directory / f"step_{steps_done}"
    out.mkdir(parents=True, exist_ok=True)
    if distributed_optimizer:  # collective over the data-parallel group
        optimizer.save_parameter_state(str(_dist_opt_file(out)))
    state = {
        "steps_done": steps_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_states(),
        "meta": meta,
    }
    tmp = out / f"rank_{rank:05d}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / f"rank_{rank:05d}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        (out / "meta.json").write_text(
            json.dumps(dict(meta, steps_done=steps_done), indent=2, sort_keys=True)
        )
        (directory / "latest").write_text(f"step_{steps_done}\n")
    return out


def resolve_checkpoint(path) -> Path:
    """A ``step_<N>`` folder, or a checkpoint dir with a ``latest`` file -> the step folder."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a step_<N> folder with meta.json, or a checkpoint dir with 'latest'"
        )
    return path


def check_compatible(saved: dict, current: dict, path) -> None:
    """Raise ``CheckpointMismatchError`` naming every key that differs."""
    diffs = []
    for key in (
        "plan_hash",
        "model",
        "tp",
        "pp",
        "world_size",
        "loss_normalization",
        "distributed_optimizer",
    ):
        if saved.get(key) != current.get(key):
            what = {
                "plan_hash": "plan",
                "model": "model config",
                "tp": "tensor parallel size",
                "pp": "pipeline parallel size",
                "world_size": "world size",
                "loss_normalization": "loss normalization",
                "distributed_optimizer": "distributed-optimizer setting",
            }[key]
            detail = (
                "" if key in ("plan_hash", "model") else f" ({saved.get(key)!r} vs now {current.get(key)!r})"
            )
            if key == "model":
                keys = sorted(
                    k
                    for k in set(saved["model"]) | set(current["model"])
                    if saved["model"].get(k) != current["model"].get(k)
                )
                detail = f" (differs in: {', '.join(keys)})"
            diffs.append(what + detail)
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved with a different {'; '.join(diffs)}; resume with the plan, model "
            "and layout it was made with, or start without --load"
        )


def _inner_torch_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in chained if hasattr(o, "optimizer")]


def _load_dist_opt_state(optimizer, f: Path) -> None:
    """``load_parameter_state`` with two Megatron 0.19.2 quirks of the non-TE (torch Adam) path
    worked around: it copies into every tensor of a param's state, including the ``step``
    tensor the file does not hold (KeyError), and ``load_state_dict`` gave every param the
    SAME ``step`` tensor (torch's Adam increments it in place once per param)."""
    inner = _inner_torch_optimizers(optimizer)
    steps = []
    for opt in inner:
        for st in opt.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                steps.append((st, st["step"].detach().clone()))
                st["step"] = float(st["step"])
    with torch.no_grad():  # fp32 main params are views of the model's leaf parameters
        optimizer.load_parameter_state(str(f))
    for st, step in steps:
        st["step"] = step.clone()


def load_checkpoint(
    path, *, rank: int, model, optimizer, scheduler, current_meta: dict, distributed_optimizer=False
) -> int:
    """Restore this rank's state; returns the number of plan steps already done."""
    path = resolve_checkpoint(path)
    saved_meta = json.loads((path / "meta.json").read_text())
    check_compatible(saved_meta, current_meta, path)
    f = path / f"rank_{rank:05d}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no file for rank {rank} ({f.name})")
    state = torch.load(f, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if distributed_optimizer:
        f = _dist_opt_file(path)
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no distributed-optimizer state {f.name}")
        _load_dist_opt_state(optimizer, f)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(state["rng"])
    return int(state["steps_done"])
