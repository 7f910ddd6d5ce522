"""Every RNG a resumed run needs (torch, CUDA, Python, NumPy's legacy global state, Megatron's
model-parallel CUDA tracker), stored as tensors, numbers and tuples so that a checkpoint holding
them loads weights-only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


def rng_states() -> dict:
    """Every RNG state as tensors, numbers and tuples (loadable weights-only)."""
    name, key, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the legacy global state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),  # (version, tuple of ints, None or float)
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "tracker" in states:  # absent after a TP change for a TP rank the checkpoint did not have
        get_cuda_rng_tracker().set_states(states["tracker"])
