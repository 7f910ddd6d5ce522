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
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a sample-info .npz file ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: a bare .npy array, not a sample-info .npz; pass it with --lengths, or make a sample info "
            "with tools/preprocess_lengths.py"
        )
    with z:
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
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise ValueError(
            f"{path}: not a NumPy .npy file of integer lengths (np.save(path, lengths)); a sample-info .npz "
            "goes to --sample-info"
        ) from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        raise ValueError(
            f"{path}: an .npz archive, not a .npy array; pass a sample-info .npz with --sample-info"
        )
    if arr.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D array of lengths, got shape {arr.shape}")
    return arr
