"""Adaptive context parallelism for packed THD micro-batches (pure torch + torch.distributed).

- :func:`build_cp_groups` — process groups for every CP degree of a plan, built once.
- :func:`shard_for_cp` / :func:`unshard_from_cp` / :func:`cp_local_indices` /
  :func:`cp_position_ids` — the load-balanced "2·c chunks" split of every document.
- :func:`ulysses_attention` — causal attention within documents across a CP group (Ulysses:
  all-to-all from token shards to head shards; per-rank work and saved memory exactly 1/c).
- :func:`cp_attention` — the same result by all-gathering K/V (fallback and reference).
- :func:`cp_comm_bytes` — bytes sent per rank by that scheme.

No Megatron import here: ``megatron_hbp.mcore`` calls these. See docs/cp.md.
"""

from megatron_hbp.cp.attention import (
    auto_attention_backend,
    cp_attention,
    cp_attention_local,
    gather_from_cp,
    varlen_attn_available,
)
from megatron_hbp.cp.comm import cp_comm_bytes
from megatron_hbp.cp.groups import CPGroups, build_cp_groups, cp_group_ranks, dp_cp_group_ranks
from megatron_hbp.cp.sharding import (
    cp_local_indices,
    cp_position_ids,
    shard_for_cp,
    unshard_from_cp,
    validate_cp_layout,
)
from megatron_hbp.cp.ulysses import (
    check_ulysses_heads,
    kv_heads_per_rank,
    ulysses_attention,
    ulysses_comm_bytes,
)

__all__ = [
    "CPGroups",
    "auto_attention_backend",
    "build_cp_groups",
    "check_ulysses_heads",
    "kv_heads_per_rank",
    "ulysses_attention",
    "ulysses_comm_bytes",
    "cp_attention",
    "cp_attention_local",
    "cp_comm_bytes",
    "cp_group_ranks",
    "cp_local_indices",
    "cp_position_ids",
    "dp_cp_group_ranks",
    "gather_from_cp",
    "shard_for_cp",
    "unshard_from_cp",
    "validate_cp_layout",
    "varlen_attn_available",
]
