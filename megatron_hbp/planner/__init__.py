"""HBP planner: hierarchical groups, packing + GreedyFill, attention-balanced batching, plan files.

Pure Python/NumPy (no torch, no megatron). Entry points::

    from megatron_hbp.planner import PlanConfig, GroupConfig, build_plan, load_plan
    plan = build_plan(lengths, loss_tokens, config, fingerprint=info_fingerprint)
    plan.save("runs/x/plan.npz"); plan = load_plan("runs/x/plan.npz", fingerprint=fp)
    for step in plan: step.replicas[r].micro_batches[k].packs[0].cu_seqlens_padded
    plan.workload.step_cp, plan.workload.entry_pairs("ulysses")   # each rank's share, derived once

See docs/planner.md.
"""

from megatron_hbp.planner.balance import balance_layout, max_over_mean, pack_cost, replica_sums
from megatron_hbp.planner.build import PlanInputError, build_plan, order_steps
from megatron_hbp.planner.config import GroupConfig, PlanConfig, load_plan_config
from megatron_hbp.planner.metrics import compute_metrics, step_metrics
from megatron_hbp.planner.packing import best_fit_decreasing, cp_padded, group_data, isf_pack, next_fit
from megatron_hbp.planner.plan import (
    DROP_REASONS,
    Dropped,
    MicroBatch,
    Pack,
    Plan,
    PlanFormatError,
    PlanMismatchError,
    Replica,
    Step,
    load_plan,
)
from megatron_hbp.planner.workload import Workload, derive_workload, zigzag_attention_pairs, zigzag_doc_pairs

__all__ = [
    "DROP_REASONS",
    "Dropped",
    "GroupConfig",
    "MicroBatch",
    "Pack",
    "Plan",
    "PlanConfig",
    "PlanFormatError",
    "PlanInputError",
    "PlanMismatchError",
    "Replica",
    "Step",
    "Workload",
    "balance_layout",
    "best_fit_decreasing",
    "build_plan",
    "compute_metrics",
    "derive_workload",
    "cp_padded",
    "group_data",
    "isf_pack",
    "load_plan",
    "load_plan_config",
    "max_over_mean",
    "next_fit",
    "order_steps",
    "pack_cost",
    "replica_sums",
    "step_metrics",
    "zigzag_attention_pairs",
    "zigzag_doc_pairs",
]
