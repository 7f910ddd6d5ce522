"""Triton kernels of megatron-hbp (installed as ``megatron_hbp.kernels``).

Imports only torch and triton. Each kernel lives in one module with its Triton code, a
PyTorch reference (also the CPU fallback), the launcher and the public function:

- :func:`attention_cost`: exact causal-attention pairs per pack and zigzag CP rank.
- :func:`token_balanced_cross_entropy`: fused linear + cross-entropy summed over loss tokens
  and divided by a caller-given normalizer, vocab-parallel, without [T, V] logits.
"""

from .attention_cost import attention_cost, attention_cost_reference, attention_pairs_to_flops
from .cross_entropy import (
    count_loss_tokens,
    token_balanced_cross_entropy,
    token_balanced_cross_entropy_from_logits,
    token_balanced_cross_entropy_from_logits_reference,
    token_balanced_cross_entropy_reference,
)

__all__ = [
    "attention_cost",
    "attention_cost_reference",
    "attention_pairs_to_flops",
    "count_loss_tokens",
    "token_balanced_cross_entropy",
    "token_balanced_cross_entropy_from_logits",
    "token_balanced_cross_entropy_from_logits_reference",
    "token_balanced_cross_entropy_reference",
]
