"""Token-balanced cross-entropy (one op, one folder); the code is in ``fused_linear.py``."""

from .fused_linear import (
    count_loss_tokens,
    token_balanced_cross_entropy,
    token_balanced_cross_entropy_from_logits,
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
