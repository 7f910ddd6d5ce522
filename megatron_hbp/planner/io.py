"""Reading planner inputs: a sample-info ``.npz`` or a bare ``.npy`` of lengths."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_sample_info(path: str | Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """``(lengths [N] int32, loss_tokens [N] int32, fingerprint)`` from a sample-info ``.npz``
    (keys ``lengths``, ``loss_tokens``, ``fingerprint``; see the data package)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample info not found: {path} (make one with the preprocessing tool)")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("lengths", "loss_tokens") if k not in z.files]
        if missing:
            raise ValueError(f"{path}: not a sample-info file, missing arrays {missing} (has {z.files})")
        lengths = z["lengths"]
        loss = z["loss_tokens"]
        fp = str(z["fingerprint"]) if "fingerprint" in z.files else None
    return lengths, loss, fp


def read_lengths(path: str | Path) -> np.ndarray:
    """``[N]`` lengths from a ``.npy`` file (synthetic studies; loss tokens = lengths)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lengths file not found: {path} (make one with tools/synth_lengths.py)")
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array of lengths, got shape {arr.shape}")
    return arr
