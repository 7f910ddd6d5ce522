"""Cost model, automatic group selection and cluster simulator (pure Python/NumPy).

    from megatron_hbp.costmodel import CostModel, AnalyticProfiler, select_groups_paper
    cm = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32)
    cm.microbatch_time(pack_tokens, pairs, cp, recompute_layers)   # seconds per micro-batch
    cm.memory(pack_tokens, cp, recompute_layers).total             # bytes per GPU
    cm.min_recompute_layers(pack_tokens, cp)                       # GreedyProfileCkpt, computed

Formulas and sources: ``megatron_hbp.costmodel.model``; docs/costmodel.md.
"""

from megatron_hbp.costmodel.hardware import ClusterConfig, HardwareProfile, available_hardware, load_hardware
from megatron_hbp.costmodel.model import CostModel, Efficiency, MemoryBreakdown, TimeComponents, TrainingSetup
from megatron_hbp.costmodel.profiler import (
    AnalyticProfiler,
    CalibrationPoint,
    CalibrationReport,
    Profiler,
    ProfileResult,
    calibrate,
    calibration_settings,
    holdout_calibration,
    measure_points,
    profile_packs,
)
from megatron_hbp.costmodel.select import (
    Candidate,
    GroupChoice,
    GroupSetScore,
    Selection,
    evaluate_group_set,
    find_best_sp_ckpt,
    greedy_profile_ckpt,
    pick_fastest,
    plan_config_for,
    select_groups_paper,
    select_groups_simulated,
    simulate_group_set,
)
from megatron_hbp.costmodel.simulate import (
    SimResult,
    Strategy,
    default_strategies,
    format_table,
    run_strategies,
    simulate_dynamic_cp,
    simulate_dynamic_cp_upstream,
    simulate_plan,
)
from megatron_hbp.planner.workload import zigzag_attention_pairs, zigzag_doc_pairs

__all__ = [
    "AnalyticProfiler",
    "CalibrationPoint",
    "CalibrationReport",
    "Candidate",
    "ClusterConfig",
    "CostModel",
    "Efficiency",
    "GroupChoice",
    "HardwareProfile",
    "MemoryBreakdown",
    "ProfileResult",
    "Profiler",
    "Selection",
    "SimResult",
    "Strategy",
    "TimeComponents",
    "TrainingSetup",
    "available_hardware",
    "calibrate",
    "calibration_settings",
    "holdout_calibration",
    "default_strategies",
    "find_best_sp_ckpt",
    "format_table",
    "greedy_profile_ckpt",
    "load_hardware",
    "measure_points",
    "GroupSetScore",
    "evaluate_group_set",
    "pick_fastest",
    "plan_config_for",
    "profile_packs",
    "run_strategies",
    "select_groups_paper",
    "select_groups_simulated",
    "simulate_dynamic_cp",
    "simulate_dynamic_cp_upstream",
    "simulate_group_set",
    "simulate_plan",
    "zigzag_attention_pairs",
    "zigzag_doc_pairs",
]
