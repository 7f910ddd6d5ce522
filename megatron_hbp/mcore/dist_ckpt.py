"""Model and optimizer state through Megatron-Core ``dist_checkpointing`` (the ``torch_dist`` format).

:func:`save_dist` writes ``model.sharded_state_dict()`` of the GPTModel and
``optimizer.sharded_state_dict(...)`` (the distributed optimizer in Megatron's
``fully_reshardable`` form: one canonical fp32 param / ``exp_avg`` / ``exp_avg_sq`` tensor per
model parameter) into one folder; :func:`load_dist` reads it back at any TP size and any number
of data-parallel ranks (Megatron re-slices every tensor from the global shapes), with the plain
or the distributed optimizer.

Loading never runs code from the folder: :func:`megatron_hbp.checkpoint_files.check_dcp_folder`
vets ``.metadata`` and every pickled object first, and while Megatron loads, the byte objects
are unpickled weights-only (DCP's planner would use ``torch.load(weights_only=False)``).

Async save (``checkpoint.async_save``): Megatron's ``AsyncCallsQueue`` with its ``mcore``
strategy, which runs on CPU / gloo: the save plan is made collectively, the tensors are staged on
the host (on CPU they already are) and a forked process per rank writes them; the fork sees the
process memory as it was when forked, so training goes on meanwhile. ``on_done`` (the manifest,
the rename, ``latest``) runs only in the finalize step, after every rank's writer finished.
:func:`wait_for_saves` blocks until then.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}

_queue = None  # megatron's AsyncCallsQueue, created on the first async save


def _gpt(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _rss_bytes() -> int:
    """This process's resident memory from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _without_psutil() -> None:
    """Megatron's torch_dist writer logs its memory use through psutil, an undeclared dependency
    that this environment does not install; without it every save fails ("psutil is not
    installed"). The number is only logged, so a /proc reading stands in."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not filesystem_async.HAVE_PSUTIL:
        filesystem_async._process_memory = _rss_bytes


def sharded_state(model, optimizer, *, is_loading: bool) -> dict:
    model_sd = _gpt(model).sharded_state_dict()
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=dict(OPTIM_METADATA))
    return {"model": model_sd, "optimizer": opt_sd}


def _async_queue():
    global _queue
    if _queue is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _queue = AsyncCallsQueue(persistent=False)
    return _queue


def pending_saves() -> int:
    return 0 if _queue is None else _queue.get_num_unfinalized_calls()


def poll_saves() -> None:
    """Finalize the async saves whose writes finished on every rank (a collective while one is
    pending: call on every rank)."""
    if pending_saves():
        _queue.maybe_finalize_async_calls(blocking=False)


def wait_for_saves() -> None:
    """Block until every pending async save is written and finalized (a collective)."""
    if pending_saves():
        _queue.maybe_finalize_async_calls(blocking=True)


def save_dist(folder, model, optimizer, *, async_save: bool = False, on_done=None) -> None:
    """Write the model and optimizer state into ``folder`` (a collective; the folder exists).
    ``on_done()`` runs on every rank once the files are complete (at once, or for an async
    save in :func:`poll_saves` / :func:`wait_for_saves`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    _without_psutil()
    wait_for_saves()  # one save in flight at a time
    state = sharded_state(model, optimizer, is_loading=False)
    strategy = TorchDistSaveShardedStrategy("torch_dist", 1)
    if not async_save:
        dist_checkpointing.save(state, str(folder), sharded_strategy=strategy)
        if on_done is not None:
            on_done()
        return
    req = dist_checkpointing.save(
        state, str(folder), sharded_strategy=strategy, async_sharded_save=True, async_strategy="mcore"
    )
    if on_done is not None:
        req.finalize_fns.append(on_done)
    _async_queue().schedule_async_request(req)


@contextlib.contextmanager
def _weights_only_objects():
    """While active, DCP's default load planner (used by Megatron for the common state, and the
    base of Megatron's ``MCoreLoadPlanner``) unpickles stored objects weights-only instead of
    ``torch.load(weights_only=False)``. The folder was already vetted by ``check_dcp_folder``;
    this closes the gap between that check and the read."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    old = DefaultLoadPlanner.__dict__["load_bytes"]
    DefaultLoadPlanner.load_bytes = load_bytes
    try:
        yield
    finally:
        DefaultLoadPlanner.load_bytes = old


def _torch_optimizers(optimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in chained if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer)]


def _init_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam its zero state and a ``step`` tensor. Megatron
    0.19.2's non-TE distributed optimizer reads ``step`` of every state entry to build the
    sharded state dict for loading (and fails on a fresh optimizer); the values are overwritten
    by the load."""
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p.data)
                    st["exp_avg_sq"] = torch.zeros_like(p.data)
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)


def _unshare_steps(optimizer) -> None:
    """Megatron's ``load_state_dict`` (non-TE path) gives every parameter the SAME ``step``
    tensor, which torch's Adam then increments in place once per parameter: one tensor each."""
    for opt in _torch_optimizers(optimizer):
        for st in opt.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()


class _SkipMissing(dict):
    def __missing__(self, key):
        return None


@contextlib.contextmanager
def _param_state_without_step(optimizer):
    """Megatron 0.19.2's non-TE distributed optimizer copies the loaded per-parameter tensors into
    EVERY tensor of a parameter's Adam state, ``step`` included, which the checkpoint does not hold
    (KeyError: 'step'). While this is active, entries the checkpoint lacks are left as they are
    (``step`` comes from ``param_groups`` through the inner ``load_state_dict``)."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def tolerant(model_param, tensors, _set=setter):
            return _set(model_param, _SkipMissing(tensors))

        opt._set_main_param_and_optimizer_states = tolerant
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def load_dist(folder, model, optimizer) -> None:
    """Load the model and optimizer state of ``folder`` (vetted with ``check_dcp_folder``) into
    the live ``model`` / ``optimizer`` of any TP size and data-parallel width (a collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import StrictHandling

    _init_adam_state(optimizer)
    state = sharded_state(model, optimizer, is_loading=True)
    with _weights_only_objects():
        loaded = dist_checkpointing.load(state, str(Path(folder)), strict=StrictHandling.RAISE_ALL)
    with torch.no_grad():
        _gpt(model).load_state_dict(loaded["model"], strict=True)
    with _param_state_without_step(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    _unshare_steps(optimizer)
