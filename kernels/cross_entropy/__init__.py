"""Token-balanced cross-entropy without ``[T, V]`` logits, vocab-parallel (one op, one folder).

Public API (also re-exported by ``megatron_hbp.kernels``)::

    token_balanced_cross_entropy(hidden, weight, labels, normalizer=None, ...)   fused linear + CE
    token_balanced_cross_entropy_from_logits(logits, labels, normalizer=None, ...)
    count_loss_tokens(labels, ignore_index=-100)
    token_balanced_cross_entropy_reference(...), ..._from_logits_reference(...)   fp32 oracles

Layout:

- ``fused_linear.py``: the math (module docstring), the two grad modes ("recompute",
  "in_forward") as autograd functions, the default-mode rule, the public fused function.
- ``from_logits.py``: the autograd function and public function on given logits.
- ``kernel.py``: Triton kernels (fused linear forward/backward tiles with ``tl.dot``; logits
  forward/backward tiles), their launch configurations and launchers.
- ``chunked.py``: the chunked PyTorch implementation (the CPU fallback).
- ``common.py``: vocabulary-parallel bookkeeping, chunk sizes, the reduction over the
  tensor-parallel group, loss and gradient scale, :func:`count_loss_tokens`.
- ``validate.py``: argument checks (one-line errors).
- ``reference.py``: plain fp32 PyTorch references for tests.
"""

from __future__ import annotations

from .common import count_loss_tokens
from .from_logits import token_balanced_cross_entropy_from_logits
from .fused_linear import token_balanced_cross_entropy
from .reference import (
    token_balanced_cross_entropy_from_logits_reference,
    token_balanced_cross_entropy_reference,
)

__all__ = [
    "count_loss_tokens",
    "token_balanced_cross_entropy",
    "token_balanced_cross_entropy_from_logits",
    "token_balanced_cross_entropy_from_logits_reference",
    "token_balanced_cross_entropy_reference",
]
