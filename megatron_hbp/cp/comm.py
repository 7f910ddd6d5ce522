"""Communication accounting of the CP attention (reported next to CR in the metrics file).

Scheme (:func:`~megatron_hbp.cp.attention.cp_attention`): per attention layer and
micro-batch, the forward pass all-gathers K and V of the CP group, the backward pass
all-gathers them again (the forward keeps only the local shard) and reduce-scatters dK and dV. With bandwidth-optimal (ring) collectives every rank sends
``(c − 1)`` blocks of its local K+V size per collective:

    block  = 2 (K and V) · t_local · h_kv · d · bytes_per_element,   t_local = T_padded / c
    sent   = (c − 1) · block · (forward passes + backward passes)

A layer whose activations are recomputed runs its forward (and its all-gather) twice.
Single-rank groups (c = 1) send nothing — the communication HBP saves for short samples.
"""

from __future__ import annotations

from megatron_hbp.planner.workload import cp_comm_bytes as _workload_cp_comm_bytes

__all__ = ["cp_comm_bytes"]


def cp_comm_bytes(
    num_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    cp_size: int,
    *,
    num_layers: int = 1,
    recompute_layers: int = 0,
    dtype_bytes: int = 2,
    backward: bool = True,
) -> int:
    """Bytes one rank sends for CP attention on one micro-batch.

    Args:
        num_tokens: padded tokens of the packed micro-batch (whole pack, all CP ranks:
            ``cu_seqlens_padded[-1]``).
        num_kv_heads: key/value heads on this rank (after tensor parallelism: ``h_kv / tp``).
        head_dim: ``d``.
        cp_size: CP degree ``c`` of the step.
        num_layers: transformer layers on this rank (pipeline stage).
        recompute_layers: how many of them recompute their forward in the backward pass; more
            than ``num_layers`` counts as all of them (as Megatron's "block" recompute does when a
            plan group's setting exceeds one pipeline stage's layers).
        dtype_bytes: bytes per element of K/V (2 for bf16, 4 for fp32).
        backward: include the backward reduce-scatter (training) or not (forward only).
    Returns:
        Bytes sent by one rank (int). Multiply by ``c`` for the whole group.
    """
    for name, val in (
        ("num_tokens", num_tokens),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("num_layers", num_layers),
        ("recompute_layers", recompute_layers),
    ):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if cp_size > 1 and num_tokens % cp_size:
        raise ValueError(f"num_tokens {num_tokens} is not divisible by cp_size {cp_size}")
    # the one formula (NumPy, vectorised): megatron_hbp.planner.workload.cp_comm_bytes
    return int(
        _workload_cp_comm_bytes(
            num_tokens, cp_size, cp_impl="allgather", num_heads=num_kv_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, num_layers=num_layers, recompute_layers=recompute_layers,
            dtype_bytes=dtype_bytes, backward=backward,
        )
    )  # fmt: skip
