"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check the math; this checks that the same source also lowers through
the real compiler (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas), with the
launch configurations the launchers use and the specialisation Triton applies at launch
(16-byte aligned pointers, strides divisible by 16). It also checks that the bf16 ``tl.dot``
kernels become pipelined Hopper GEMMs (``warp_group_dot`` fed by async copies), the
property their speed depends on. Runs in a subprocess: the kernels must be decorated with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

POINTER_TYPES = {
    "lengths_ptr": "*i32",
    "offsets_ptr": "*i64",
    "out_ptr": "*i64",
    "labels_ptr": "*i64",
    "m_ptr": "*fp32",
    "s_ptr": "*fp32",
    "tgt_ptr": "*fp32",
    "lse_ptr": "*fp32",
    "g_ptr": "*fp32",
    "rstd_ptr": "*fp32",
    "dw_partial_ptr": "*fp32",
    "pos_ptr": "*i64",
    "inv_freq_ptr": "*fp32",
}
SCALAR_TYPES = {"eps": "fp32"}
DIVISIBLE_INTS = {"H", "stride_h", "stride_w", "stride_dz", "stride_x", "stride_dx"}


def _compile(kernel, float_type: str, constexprs: dict, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, float_type)
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = SCALAR_TYPES.get(name, "i32")
            if name in DIVISIBLE_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _child() -> None:
    import torch
    import triton

    ac = importlib.import_module("megatron_hbp.kernels.attention_cost.kernel")
    ce = importlib.import_module("megatron_hbp.kernels.cross_entropy.kernel")
    for cp in (1, 3, 8):
        consts = {"CP": cp, "CP_POW2": triton.next_power_of_2(cp), "BLOCK_P": ac.BLOCK_P}
        assert "cubin" in _compile(ac._attention_cost_kernel, "", consts, {}).asm
    for dtype, float_type in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        cfg = ce._linear_blocks(dtype)
        options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        cfg.update(UPCAST=False, IEEE=dtype == torch.float32)
        for kernel in (ce._flce_fwd_kernel, ce._flce_bwd_kernel):
            compiled = _compile(kernel, float_type, dict(cfg), options)
            assert "cubin" in compiled.asm
            ttgir = compiled.asm["ttgir"]
            if dtype == torch.bfloat16:
                assert "warp_group_dot" in ttgir, f"{kernel.__name__}: bf16 tl.dot did not become wgmma"
                assert "async_copy_global_to_local" in ttgir, f"{kernel.__name__}: loads not pipelined"
        cfg = ce._logits_blocks()
        options = {"num_warps": cfg.pop("num_warps")}
        for kernel in (ce._ce_logits_fwd_kernel, ce._ce_logits_bwd_kernel):
            assert "cubin" in _compile(kernel, float_type, dict(cfg), options).asm
    _compile_layer_kernels()
    print("compiled all kernels for sm_90")


def _compile_layer_kernels() -> None:
    """RMSNorm, SwiGLU and RoPE at the launch configurations of their launchers, bf16 and fp32,
    hidden sizes 64 ... 8192 (every constexpr combination the trainer's shapes produce)."""
    rms = importlib.import_module("megatron_hbp.kernels.rmsnorm.kernel")
    glu = importlib.import_module("megatron_hbp.kernels.swiglu.kernel")
    rope = importlib.import_module("megatron_hbp.kernels.rope.kernel")
    for float_type in ("*bf16", "*fp32"):
        for H in (64, 1000, 2048, 4096, 8192):
            block_rows, block_h, num_warps = rms._blocks(H, None)
            for has_res in (False, True):
                consts = {"HAS_RESIDUAL": has_res, "BLOCK_ROWS": block_rows, "BLOCK_H": block_h}
                assert (
                    "cubin"
                    in _compile(rms._rmsnorm_fwd_kernel, float_type, consts, {"num_warps": num_warps}).asm
                )
                consts = {"HAS_DRES": has_res, "BLOCK_ROWS": block_rows, "BLOCK_H": block_h}
                assert (
                    "cubin"
                    in _compile(rms._rmsnorm_bwd_kernel, float_type, consts, {"num_warps": num_warps}).asm
                )
        for F in (64, 1000, 5632, 8192):
            block_rows, block_f, num_warps = glu._blocks(F)
            consts = {"BLOCK_ROWS": block_rows, "BLOCK_F": block_f}
            for kernel in (glu._swiglu_fwd_kernel, glu._swiglu_bwd_kernel):
                assert "cubin" in _compile(kernel, float_type, dict(consts), {"num_warps": num_warps}).asm
        for head_dim in (64, 128, 256):
            block_t, block_half, num_warps = rope._blocks(head_dim // 2)
            for sign in (1, -1):
                consts = {"SIGN": sign, "BLOCK_T": block_t, "BLOCK_HALF": block_half}
                compiled = _compile(rope._rope_qk_kernel, float_type, consts, {"num_warps": num_warps})
                assert "cubin" in compiled.asm
                # cos/sin must be the accurate libdevice functions (angles reach ~1e5 rad), not
                # the approximate sin.approx/cos.approx instructions.
                assert "sin.approx" not in compiled.asm["ptx"] and "cos.approx" not in compiled.asm["ptx"]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "compiled all kernels for sm_90" in result.stdout


if __name__ == "__main__":
    _child()
