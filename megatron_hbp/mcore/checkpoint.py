"""Checkpoints: Megatron ``dist_checkpointing`` (torch_dist) in atomic step folders with a manifest.

Layout (``checkpoint.format: torch_dist``, the default)::

    <dir>/step_<N>/dist/                   Megatron torch_dist folder: model + optimizer state
    <dir>/step_<N>/dist/.metadata            (DCP metadata), __<r>_0.distcp (data), metadata.json
    <dir>/step_<N>/rank_<RRRRR>.pt         this rank's scheduler and RNG states (weights-only)
    <dir>/step_<N>/meta.json               plan hash, model config, layout, CP backend, steps done
    <dir>/step_<N>/manifest.json           format, steps done, meta, each file's size and sha256
    <dir>/latest                           ``step_<N>`` of the newest complete save

``N`` is the number of plan steps done, so a resume continues with plan step ``N`` (the data
position follows from it: every rank's micro-batches are a function of the plan and the step).
The model is ``GPTModel.sharded_state_dict()``; the optimizer ``optimizer.sharded_state_dict()``,
for Megatron's distributed optimizer in its ``fully_reshardable`` form (``mcore.dist_ckpt``), so
one checkpoint loads at another TP size and on fewer data-parallel ranks, with either optimizer
setting it was saved with.

A save writes ``step_<N>.tmp``, fsyncs every file, gathers the ranks' sizes and checksums into
the manifest, renames the folder and then replaces ``latest`` (``megatron_hbp.checkpoint_files``),
so a job killed during a save leaves only a ``.tmp`` folder that ``--load DIR`` skips with a
warning. With ``checkpoint.async_save`` the torch_dist files are written by a background process
and the manifest / rename / ``latest`` happen only after every rank's write finished
(:func:`poll_saves`, :func:`wait_for_saves`). ``--load DIR`` takes the newest step folder whose
files all match the manifest (the ranks share the checksum work); ``--load DIR/step_<N>`` uses
that folder or names its bad file.

Nothing is unpickled with code execution: our files are read weights-only
(``torch.load(weights_only=True)``); the torch_dist folder's ``.metadata`` goes through a
restricted unpickler and its pickled objects are read weights-only before Megatron sees the
folder (``checkpoint_files.check_dcp_folder``); a file naming any other object is refused.

``checkpoint.format: per_rank`` keeps the earlier format (one ``torch.save`` file per rank with
model, optimizer, scheduler and RNG; ``dist_opt_tp<T>_pp<P>.pt`` for the distributed optimizer's
Adam states gathered to data-parallel rank 0). ``--load`` reads either format (the manifest's
``checkpoint_format``); per_rank changes the layout only with the plain fp32 optimizer
(``ckpt_reshard``).

``--load`` refuses a checkpoint made from a different plan (plan hash), model config, or a layout
it cannot be moved to, with a message naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from megatron_hbp.checkpoint_files import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    begin_step,
    check_dcp_folder,
    commit_step,
    file_entry,
    prune,
    safe_load,
    select_step,
    tmp_step_dir,
    verify_step,
)
from megatron_hbp.mcore.ckpt_per_rank import (
    dist_opt_name,
    dist_opt_writer,
    load_dist_opt_state,
    rank_name,
    read_per_rank,
    require_groups,
)
from megatron_hbp.mcore.rng_state import rng_states, set_rng_states

__all__ = [
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "check_compatible",
    "load_checkpoint",
    "plan_hash",
    "poll_saves",
    "resolve_checkpoint",
    "save_checkpoint",
    "wait_for_saves",
]

FORMATS = ("torch_dist", "per_rank")
DIST_DIR = "dist"


def poll_saves() -> None:
    """Finalize finished async saves (a collective while one is pending; cheap otherwise)."""
    from megatron_hbp.mcore.dist_ckpt import poll_saves as poll

    poll()


def wait_for_saves() -> None:
    """Block until every async save is written and committed (a collective while one is pending)."""
    from megatron_hbp.mcore.dist_ckpt import wait_for_saves as wait

    wait()


def plan_hash(plan) -> str:
    """sha256 of the plan's content: its config and every array (steps, packs, sample indices)."""
    from megatron_hbp.configio import to_dict

    h = hashlib.sha256(json.dumps(to_dict(plan.config), sort_keys=True).encode())
    for key in sorted(plan.arrays):
        arr = np.ascontiguousarray(plan.arrays[key])
        h.update(f"|{key}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _gather(obj) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


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
    keep_last: int = 0,
    groups=None,
    fmt: str = "torch_dist",
    async_save: bool = False,
) -> Path:
    """Save one step atomically (a collective: every rank calls it). Returns ``step_<N>``.

    ``groups``: this rank's ``megatron_hbp.mcore.parallel.ParallelGroups`` (needed with
    ``distributed_optimizer``, whose state file is named by the TP and PP rank).

    Every rank writes and fsyncs its files in ``step_<N>.tmp`` and reports their sizes and
    sha256; rank 0 writes ``meta.json`` and the manifest, renames the folder, replaces
    ``latest`` and, with ``keep_last`` > 0, deletes older step folders beyond the newest K.
    With ``fmt="torch_dist"`` and ``async_save`` the torch_dist files are written in the
    background and all of that happens later, once they are complete (:func:`poll_saves`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    directory = Path(directory)
    if fmt == "torch_dist":
        from megatron_hbp.mcore.dist_ckpt import wait_for_saves as _wait

        _wait()  # the previous async save is committed before this one starts
    if rank == 0:
        begin_step(directory, steps_done)
    _barrier()
    tmp = tmp_step_dir(directory, steps_done)
    out = directory / f"step_{steps_done}"
    mine = {}
    state = {
        "steps_done": steps_done,
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
    }
    if fmt == "per_rank":
        if distributed_optimizer:  # collective over the data-parallel group; DP rank 0 writes
            name = dist_opt_name(groups)
            optimizer.save_parameter_state(str(tmp / name))
            if dist_opt_writer(optimizer):
                mine[name] = file_entry(tmp / name)
        state["model"] = model.state_dict()
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / rank_name(rank))
    mine[rank_name(rank)] = file_entry(tmp / rank_name(rank))
    info = dict(meta, steps_done=steps_done, checkpoint_format=fmt)

    def commit():
        entries = dict(mine)
        if fmt == "torch_dist":  # the torch_dist files, complete now: each rank hashes a share
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            names = sorted(f"{DIST_DIR}/{p.name}" for p in (tmp / DIST_DIR).iterdir() if p.is_file())
            entries.update({n: file_entry(tmp / n) for n in names[rank::world]})
        files = {}
        for part in _gather(entries):
            files.update(part)
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True))
            files["meta.json"] = file_entry(tmp / "meta.json")
            final = commit_step(directory, steps_done, files, {"meta": info})
            for p in prune(directory, keep_last):
                print(f"[hbp] removed old checkpoint {p} (checkpoint.keep_last={keep_last})", flush=True)
            if async_save:
                print(f"[hbp] async save of {final} complete", flush=True)
        _barrier()

    if fmt == "torch_dist":
        from megatron_hbp.mcore.dist_ckpt import save_dist

        if rank == 0:
            (tmp / DIST_DIR).mkdir()
        _barrier()
        save_dist(tmp / DIST_DIR, model, optimizer, async_save=async_save, on_done=commit)
    else:
        commit()
    return out


def _distributed_check(step_dir: Path) -> None:
    """:func:`verify_step` shared by the ranks: each checks every size and the sha256 of every
    world-th file; all ranks raise the first problem found by any."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    err = None
    try:
        from megatron_hbp.checkpoint_files import read_manifest

        names = sorted(read_manifest(step_dir)["files"])
        verify_step(step_dir, checksum=names[rank::world])
    except CheckpointCorruptError as e:
        err = str(e)
    errors = [e for e in _gather(err) if e]
    if errors:
        raise CheckpointCorruptError(errors[0])


def resolve_checkpoint(path, *, rank: int = 0) -> Path:
    """The step folder to load: ``path`` itself if it is one (verified; a bad file is an error),
    else the newest complete and intact ``step_<N>`` in the checkpoint dir ``path`` (unfinished
    or corrupt ones skipped with a warning on rank 0). A collective when distributed."""
    return select_step(path, check=_distributed_check, warn=lambda m: rank == 0 and print(m, flush=True))


def check_compatible(saved: dict, current: dict, path, ignore: tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointMismatchError`` naming every key that differs (except those in ``ignore``)."""
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
        if key not in ignore and saved.get(key) != current.get(key):
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


_LOAD_ERRORS = (CheckpointCorruptError, UnsafeCheckpointError, FileNotFoundError, CheckpointMismatchError)


def _agreed(fn):
    """``fn()`` on every rank; if it fails on any rank, every rank raises that error (so no rank
    goes on into a collective the others never reach)."""
    result, err = None, None
    try:
        result = fn()
    except _LOAD_ERRORS as e:
        err = (type(e).__name__, str(e))
    errors = [e for e in _gather(err) if e]
    if errors:
        kind, msg = errors[0]
        raise {c.__name__: c for c in _LOAD_ERRORS}.get(kind, CheckpointMismatchError)(msg)
    return result


def _layout_change_blocker(saved: dict, current: dict, distributed_optimizer: bool) -> str | None:
    """Why a checkpoint saved at another layout cannot be loaded here (None: it can). Supported:
    another TP size, and fewer data x context ranks (a divisor of the saved count: each rank then
    accumulates the missing replicas), with PP 1; a per_rank checkpoint only with the plain fp32
    optimizer (its state is the same on every data-parallel replica)."""
    if saved.get("pp") != 1 or current.get("pp") != 1:
        return "changing the layout on resume needs pipeline parallel size 1"
    if saved.get("checkpoint_format", "per_rank") == "per_rank" and (
        distributed_optimizer or saved.get("distributed_optimizer")
    ):
        return (
            "a per_rank checkpoint changes the layout only with optimizer.use_distributed_optimizer: false "
            "(saved and now); torch_dist checkpoints (checkpoint.format: torch_dist) have no such limit"
        )
    ds, dc = saved["world_size"] // saved["tp"], current["world_size"] // current["tp"]
    if dc > ds or ds % dc:
        ok = ", ".join(str(d * current["tp"]) for d in range(ds, 0, -1) if ds % d == 0)
        return (
            f"the data x context ranks must be the saved {ds} or a divisor of it ({dc} now): launch one of "
            f"{ok} processes for tp={current['tp']}"
        )
    return None


def load_checkpoint(
    path,
    *,
    rank: int,
    model,
    optimizer,
    scheduler,
    current_meta: dict,
    distributed_optimizer=False,
    groups=None,
) -> int:
    """Restore this rank's state; returns the number of plan steps already done.

    ``groups``: this rank's ``megatron_hbp.mcore.parallel.ParallelGroups`` (needed with
    ``distributed_optimizer`` and to reshard a checkpoint saved with another TP).

    Raises ``CheckpointMismatchError`` (other plan / model / layout), ``CheckpointCorruptError``
    (unfinished or damaged folder, naming the file), ``UnsafeCheckpointError`` (a file that is
    not weights-only) or ``FileNotFoundError`` -- on every rank alike.
    """
    path = resolve_checkpoint(path, rank=rank)
    saved_meta = json.loads((path / "meta.json").read_text())
    fmt = saved_meta.get("checkpoint_format", "per_rank")
    tp_saved, tp_now = saved_meta.get("tp"), current_meta.get("tp")
    ws_saved, ws_now = saved_meta.get("world_size"), current_meta.get("world_size")
    relayout = (tp_saved, ws_saved) != (tp_now, ws_now)
    if relayout:
        why = _layout_change_blocker(saved_meta, current_meta, distributed_optimizer)
        if why:
            raise CheckpointMismatchError(
                f"checkpoint {path} was saved with tp={tp_saved} on {ws_saved} processes (now tp={tp_now} on "
                f"{ws_now}): {why}"
            )
    # Same TP, fewer data-parallel replicas: rank (dp d, tp t) is the same global rank d * tp + t in
    # both layouts (pp 1) and every replica's state is the same, so each rank reads its own file.
    check_compatible(saved_meta, current_meta, path, ignore=("tp", "world_size") if relayout else ())
    if fmt == "torch_dist":
        return _load_torch_dist(
            path, saved_meta, model=model, optimizer=optimizer, scheduler=scheduler, groups=groups
        )
    if fmt != "per_rank":
        raise CheckpointCorruptError(f"{path / 'meta.json'}: unknown checkpoint_format {fmt!r}")

    state, dopt = _agreed(
        lambda: read_per_rank(
            path, rank, saved_meta, tp_now=tp_now, optimizer=optimizer, model=model, groups=groups,
            distributed_optimizer=distributed_optimizer,
        )
    )  # fmt: skip
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if distributed_optimizer:
        load_dist_opt_state(optimizer, dopt)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return int(state["steps_done"])


def _load_torch_dist(path: Path, saved_meta: dict, *, model, optimizer, scheduler, groups=None) -> int:
    """Load a torch_dist step folder at this layout (checked by the caller): every rank vets its
    share of the folder's pickles, reads the scheduler / RNG file of the saved rank at its
    (data-parallel rank, TP rank) and Megatron re-slices model and optimizer state."""
    from megatron_hbp.mcore.dist_ckpt import load_dist

    me = require_groups(groups, f"loading torch_dist checkpoint {path}")
    tp_saved = int(saved_meta["tp"])
    tp_rank = me.tp_rank
    src = me.dp_rank * tp_saved + (tp_rank if tp_rank < tp_saved else 0)

    def read():
        check_dcp_folder(path / DIST_DIR)
        f = path / rank_name(src)
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {f.name}")
        state = safe_load(f)
        if not isinstance(state, dict) or not {"scheduler", "rng", "steps_done"} <= set(state):
            raise CheckpointCorruptError(f"{f}: not a megatron-hbp rank checkpoint (keys missing)")
        return state

    state = _agreed(read)

    def load():
        try:
            load_dist(path / DIST_DIR, model, optimizer)
        except Exception as e:  # Megatron's CheckpointingException and friends: one line
            first = str(e).strip().splitlines()[0][:400] if str(e).strip() else type(e).__name__
            raise CheckpointMismatchError(
                f"checkpoint {path / DIST_DIR} cannot be loaded here: {first}"
            ) from None

    _agreed(load)
    scheduler.load_state_dict(state["scheduler"])
    rng = dict(state["rng"])
    if tp_rank >= tp_saved:  # Megatron's model-parallel RNG of a TP rank the checkpoint did not have
        rng.pop("tracker", None)
    set_rng_states(rng)
    return int(state["steps_done"])
