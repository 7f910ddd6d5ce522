"""Plain fp32 PyTorch references of the token-balanced cross-entropy (tests' oracle:
unchunked, single process, full vocabulary)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_balanced_cross_entropy_from_logits_reference", "token_balanced_cross_entropy_reference"]


def token_balanced_cross_entropy_from_logits_reference(
    logits: torch.Tensor, labels: torch.Tensor, normalizer=None, ignore_index: int = -100
) -> torch.Tensor:
    """Plain fp32 PyTorch (unchunked, single process, full vocabulary) for tests."""
    loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index, reduction="sum")
    if normalizer is not None:
        loss = loss / (normalizer.float() if isinstance(normalizer, torch.Tensor) else float(normalizer))
    return loss


def token_balanced_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer=None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain fp32 PyTorch: materialises ``hidden.float() @ weight.float().T`` (tests only)."""
    return token_balanced_cross_entropy_from_logits_reference(
        hidden.float() @ weight.float().T, labels, normalizer, ignore_index
    )
