"""Repo-wide pytest setup.

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
any kernel module is imported (triton itself may already be imported by megatron.core).
"""

import os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
