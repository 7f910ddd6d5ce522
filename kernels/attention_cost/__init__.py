"""Exact causal-attention work per pack and CP rank (one op, one folder); the code is in ``kernel.py``."""

from .kernel import attention_cost, attention_cost_reference, attention_pairs_to_flops

__all__ = ["attention_cost", "attention_cost_reference", "attention_pairs_to_flops"]
