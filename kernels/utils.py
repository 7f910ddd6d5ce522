"""Shared helpers for the kernels: backend dispatch and small launch utilities.

Imports only torch and triton (the layering rule for ``megatron_hbp.kernels``).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Must match the value at the time ``triton.jit`` decorated the kernels, i.e. the
    variable has to be set before this package is imported (the root conftest.py does).
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device, what: str) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch") to "triton" or "torch" for ``device``.

    "auto" runs the Triton kernel on CUDA tensors and the PyTorch implementation on CPU
    tensors (the production CPU fallback). "triton" on CPU tensors is only possible in the
    Triton interpreter (tests); otherwise a ValueError says what to change.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    if backend == "auto":
        return "torch"
    if not is_interpreting():
        raise ValueError(
            f"{what}: backend='triton' on {device.type} tensors needs the Triton interpreter; set "
            "TRITON_INTERPRET=1 before importing megatron_hbp.kernels, move the tensors to CUDA, "
            "or use backend='auto'/'torch'"
        )
    return "triton"


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative Python ints."""
    return -(-a // b)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter is serial)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tests set this to True (tests/kernels: an autouse fixture): every buffer a kernel must fully
# write then starts as NaN, so an unwritten element shows up in the comparison.
POISON_OUTPUTS = False


def alloc_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer a kernel fully overwrites: ``torch.empty``, or NaN under ``POISON_OUTPUTS``."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
