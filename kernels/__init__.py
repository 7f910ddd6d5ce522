"""Triton kernels of megatron-hbp (installed as ``megatron_hbp.kernels``).

Imports only torch and triton. One folder per op (fla's ``ops/<op>/``, Liger): ``kernel.py``
(Triton code and launchers), ``reference.py`` (fp32 PyTorch: the tests' oracle, and the CPU
fallback where it is one), ``__init__.py`` (autograd function where there is a backward, and
the public API), plus what the op needs besides:

- :func:`attention_cost` (``attention_cost/``): exact causal-attention pairs per pack and
  zigzag CP rank; :func:`attention_pairs_to_flops`.
- :func:`token_balanced_cross_entropy` (``cross_entropy/``): fused linear + cross-entropy
  summed over loss tokens and divided by a caller-given normalizer, vocab-parallel, without
  [T, V] logits; :func:`token_balanced_cross_entropy_from_logits`; :func:`count_loss_tokens`.
- :func:`rms_norm` (``rmsnorm/``): RMSNorm fwd/bwd, optionally fused with the residual add.
- :func:`rope_qk` / :func:`rope` (``rope/``): RoPE on packed THD q/k by per-token positions.
- :func:`swiglu` (``swiglu/``): ``silu(gate) * up`` on the fused gate|up projection output.

Each op's benchmark sits beside its folder (``kernels/bench_<op>.py``).
"""

from .attention_cost import attention_cost, attention_cost_reference, attention_pairs_to_flops
from .cross_entropy import (
    count_loss_tokens,
    token_balanced_cross_entropy,
    token_balanced_cross_entropy_from_logits,
    token_balanced_cross_entropy_from_logits_reference,
    token_balanced_cross_entropy_reference,
)
from .rmsnorm import RMSNorm, rms_norm, rms_norm_reference
from .rope import rope, rope_qk, rope_reference
from .swiglu import SwiGLU, swiglu, swiglu_reference

__all__ = [
    "RMSNorm",
    "SwiGLU",
    "attention_cost",
    "attention_cost_reference",
    "attention_pairs_to_flops",
    "count_loss_tokens",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_qk",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "token_balanced_cross_entropy",
    "token_balanced_cross_entropy_from_logits",
    "token_balanced_cross_entropy_from_logits_reference",
    "token_balanced_cross_entropy_reference",
]
