"""Output casts of the layer kernels that round like the GPU also in the Triton interpreter.

``x.to(tl.bfloat16)`` rounds to nearest even on the GPU but truncates in the interpreter
(triton 3.6), which biases every bf16 result of a CPU test by up to one ulp towards zero;
through a model that bias adds up. :func:`to_output` applies the round-to-nearest-even bias
to the fp32 bits first when interpreting (then truncation is exact rounding); compiled, it
is a plain ``.to(dtype)`` (the branch is removed at compile time).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import is_interpreting

INTERPRET = tl.constexpr(is_interpreting())


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` with round-to-nearest-even (finite values)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)
