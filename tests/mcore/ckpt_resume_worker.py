"""Multi-process scenarios for tests/mcore/test_checkpoint_resume_dist.py (not a test module itself).

``torchrun --nproc-per-node 2 tests/mcore/ckpt_resume_worker.py WORKDIR SCENARIO...``: each scenario
trains ``plan_cp.npz`` (CP 1 and CP 2 groups, recompute on the CP 2 one) with 1 data worker per
rank, fp32 and the distributed optimizer, and writes ``WORKDIR/result_<scenario>.json`` on rank 0.
The ``kill_*`` scenarios SIGKILL rank 1 on purpose, so their launch fails. Stdlib imports only at
module level.
"""

import os
import signal
import sys
from pathlib import Path

END = 8  # steps 0..7; the interruption is after step 2 (CP 1), step 3 is CP 2 (plan: 1 2 1 2 1 1 2 1)
CUT = 3


def _cfg(work: Path, ckdir: str | None = None, load: str | None = None, **kw):
    from megatron_hbp.mcore.config import (
        CheckpointConfig,
        DataConfig,
        OptimizerConfig,
        PlanSource,
        TrainConfig,
    )

    ck = CheckpointConfig(
        dir=str(work / ckdir) if ckdir else None,
        load=str(work / load) if load else None,
        save_interval=kw.pop("save_interval", 0),
        format=kw.pop("fmt", "torch_dist"),
        async_save=kw.pop("async_save", False),
    )
    return TrainConfig(
        model="tiny",
        data=DataConfig(sample_info=str(work / "info.npz"), num_workers=1, prefetch_factor=2),
        plan=PlanSource(path=str(work / kw.pop("plan", "plan_cp.npz"))),
        optimizer=OptimizerConfig(
            lr=1e-3, warmup_steps=2, clip_grad=1.0, use_distributed_optimizer=kw.pop("distopt", True)
        ),
        checkpoint=ck,
        dtype=kw.pop("dtype", "fp32"),
        max_steps=kw.pop("max_steps", END),
        **kw,
    )


def _summary(recs) -> dict:
    return {
        "steps": [r["step"] for r in recs],
        "cp": [r["cp"] for r in recs],
        "recompute": [r["recompute_layers"] for r in recs],
        "loss": [r["loss"] for r in recs],
        "grad_norm": [r["grad_norm"] for r in recs],
        "lr": [r["lr"] for r in recs],
    }


def _kill_self_at(step: int, rank: int):
    """on_grads hook: rank 1 dies by SIGKILL in the middle of plan step ``step`` (after backward)."""

    def hook(s, model):
        if s == step and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def scenario_straight(work: Path, rank: int) -> dict:
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_straight")))


def scenario_preempt(work: Path, rank: int) -> dict:
    """SIGTERM reaches rank 1 only, during step CUT - 1: both ranks finish it, save, stop."""
    from megatron_hbp.mcore.preemption import Preempted
    from megatron_hbp.mcore.train import run

    def hook(s, model):
        if s == CUT - 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        run(_cfg(work, "ck_preempt"), on_grads=hook)
    except Preempted as e:
        first = {"steps_done": e.steps_done, "checkpoint": str(e.checkpoint), "signame": e.signame}
    else:
        first = {"steps_done": None}
    second = run(_cfg(work, "ck_preempt", load="ck_preempt"))
    return {"first": first, "second": _summary(second)}


def scenario_tp2(work: Path, rank: int) -> dict:
    """4 ranks, TP 2 (2 data x context ranks, so the CP 2 steps span both): straight, and SIGTERM
    to the last rank during step CUT - 1, then resume."""
    from megatron_hbp.mcore.config import ParallelConfig
    from megatron_hbp.mcore.preemption import Preempted
    from megatron_hbp.mcore.train import run

    tp2 = ParallelConfig(tp=2)
    straight = run(_cfg(work, "ck_tp2_straight", parallel=tp2))

    def hook(s, model):
        if s == CUT - 1 and rank == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = None
    try:
        run(_cfg(work, "ck_tp2", parallel=tp2), on_grads=hook)
    except Preempted as e:
        first = e.steps_done
    second = run(_cfg(work, "ck_tp2", load="ck_tp2", parallel=tp2))
    return {"straight": _summary(straight), "first": first, "second": _summary(second)}


def scenario_tp1_plain(work: Path, rank: int) -> dict:
    """TP 1, plain optimizer: the reference for the TP changes; saves at CUT and END."""
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_tp1_plain", distopt=False, save_interval=CUT)))


def scenario_tp2_plain(work: Path, rank: int) -> dict:
    """TP 2 (4 ranks), plain optimizer: train to CUT and save (resumed at TP 1 below); and resume
    the TP 1 checkpoint of step CUT at TP 2 to END."""
    from megatron_hbp.mcore.config import ParallelConfig
    from megatron_hbp.mcore.train import run

    tp2 = ParallelConfig(tp=2)
    first = run(_cfg(work, "ck_tp2_plain", distopt=False, max_steps=CUT, parallel=tp2))
    up = run(_cfg(work, "ck_tp2_from_tp1", load=f"ck_tp1_plain/step_{CUT}", distopt=False, parallel=tp2))
    # the same TP 2 state in the per_rank fallback format (re-split by ckpt_reshard at TP 1)
    run(_cfg(work, "ck_tp2_plain_pr", distopt=False, max_steps=CUT, parallel=tp2, fmt="per_rank"))
    return {"first": _summary(first), "from_tp1": _summary(up)}


def scenario_tp1_from_tp2(work: Path, rank: int) -> dict:
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_tp1_from_tp2", load="ck_tp2_plain", distopt=False)))


def scenario_tp1_from_tp2_per_rank(work: Path, rank: int) -> dict:
    from megatron_hbp.mcore.train import run

    return _summary(
        run(_cfg(work, "ck_tp1_from_tp2_pr", load="ck_tp2_plain_pr", distopt=False, fmt="per_rank"))
    )


def scenario_dp2_plain(work: Path, rank: int) -> dict:
    """2 data-parallel ranks, CP 1 plan, plain optimizer: the reference; saves at CUT."""
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_dp2", plan="plan_dp.npz", distopt=False, save_interval=CUT)))


def scenario_dp1(work: Path, rank: int) -> dict:
    """1 process running the 2-rank plan (each step accumulates both replicas): from scratch to CUT,
    resumed from the 2-rank checkpoint to END; and the CP 2 plan, which 1 rank cannot run."""
    from megatron_hbp.mcore.train import TrainSetupError, run

    fresh = run(_cfg(work, None, plan="plan_dp.npz", distopt=False, max_steps=CUT))
    resumed = run(_cfg(work, "ck_dp1", load=f"ck_dp2/step_{CUT}", plan="plan_dp.npz", distopt=False))
    try:
        run(_cfg(work, None, distopt=False))
        refused = ""
    except TrainSetupError as e:
        refused = str(e)
    return {"fresh": _summary(fresh), "resumed": _summary(resumed), "cp_plan": refused}


def scenario_bf16(work: Path, rank: int) -> dict:
    """bf16 on CPU: 4 steps straight vs 2 + resume to 4 (bitwise)."""
    from megatron_hbp.mcore.train import run

    straight = run(_cfg(work, None, dtype="bf16", max_steps=4))
    run(_cfg(work, "ck_bf16", dtype="bf16", max_steps=2))
    second = run(_cfg(work, "ck_bf16", load="ck_bf16", dtype="bf16", max_steps=4))
    return {"straight": _summary(straight), "second": _summary(second)}


def scenario_kill_step(work: Path, rank: int) -> dict:
    """Saves after steps 2 and 4; rank 1 is SIGKILLed in the middle of step 5."""
    from megatron_hbp.mcore.train import run

    run(_cfg(work, "ck_kill_step", save_interval=2), on_grads=_kill_self_at(5, rank))
    return {"error": "not killed"}


def scenario_kill_save(work: Path, rank: int) -> dict:
    """Saves after steps 2 and 4; rank 1 is SIGKILLed while saving step_6 (its rank file written,
    the manifest not yet)."""
    from megatron_hbp.mcore import checkpoint as ckpt
    from megatron_hbp.mcore.train import run

    real = ckpt.file_entry

    def entry(path):
        if rank == 1 and Path(path).parent.name == "step_6.tmp" and Path(path).name.startswith("rank_"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)

    ckpt.file_entry = entry
    run(_cfg(work, "ck_kill_save", save_interval=2))
    return {"error": "not killed"}


def scenario_async(work: Path, rank: int) -> dict:
    """Async torch_dist saves every 2 steps, stopped after step CUT + 1 (the last save, at the end,
    is async too: the run waits for it); then resume from the directory to END."""
    from megatron_hbp.mcore.train import run

    first = run(_cfg(work, "ck_async", save_interval=2, async_save=True, max_steps=CUT + 2))
    second = run(_cfg(work, "ck_async", load="ck_async", async_save=True))
    return {"first": _summary(first), "second": _summary(second)}


def scenario_per_rank(work: Path, rank: int) -> dict:
    """The per_rank fallback format: SIGTERM-free save at CUT, then resume (bitwise)."""
    from megatron_hbp.mcore.train import run

    run(_cfg(work, "ck_per_rank", fmt="per_rank", max_steps=CUT))
    return _summary(run(_cfg(work, "ck_per_rank", load="ck_per_rank", fmt="per_rank")))


def scenario_tp1_from_tp2_distopt(work: Path, rank: int) -> dict:
    """The TP 2 distributed-optimizer checkpoint of step CUT (scenario tp2) resumed at TP 1."""
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_tp1_from_tp2_do", load=f"ck_tp2/step_{CUT}")))


def scenario_tp2_from_tp1_distopt(work: Path, rank: int) -> dict:
    """The TP 1 distributed-optimizer checkpoint of step CUT (scenario preempt) resumed at TP 2."""
    from megatron_hbp.mcore.config import ParallelConfig
    from megatron_hbp.mcore.train import run

    return _summary(
        run(_cfg(work, "ck_tp2_from_tp1_do", load=f"ck_preempt/step_{CUT}", parallel=ParallelConfig(tp=2)))
    )


def scenario_dp2_distopt(work: Path, rank: int) -> dict:
    """2 data-parallel ranks, CP 1 plan, distributed optimizer: the reference; saves at CUT."""
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_dp2_do", plan="plan_dp.npz", save_interval=CUT)))


def scenario_dp1_distopt(work: Path, rank: int) -> dict:
    """1 process resumes the 2-rank distributed-optimizer checkpoint (accumulating both replicas)."""
    from megatron_hbp.mcore.train import run

    return _summary(run(_cfg(work, "ck_dp1_do", load=f"ck_dp2_do/step_{CUT}", plan="plan_dp.npz")))


def _resume(name):
    def scenario(work: Path, rank: int) -> dict:
        from megatron_hbp.mcore.train import run

        return _summary(run(_cfg(work, name, load=name)))

    return scenario


SCENARIOS = {
    "straight": scenario_straight,
    "preempt": scenario_preempt,
    "bf16": scenario_bf16,
    "tp2": scenario_tp2,
    "tp1_plain": scenario_tp1_plain,
    "tp2_plain": scenario_tp2_plain,
    "tp1_from_tp2": scenario_tp1_from_tp2,
    "tp1_from_tp2_per_rank": scenario_tp1_from_tp2_per_rank,
    "dp2_plain": scenario_dp2_plain,
    "dp1": scenario_dp1,
    "async": scenario_async,
    "per_rank": scenario_per_rank,
    "tp1_from_tp2_distopt": scenario_tp1_from_tp2_distopt,
    "tp2_from_tp1_distopt": scenario_tp2_from_tp1_distopt,
    "dp2_distopt": scenario_dp2_distopt,
    "dp1_distopt": scenario_dp1_distopt,
    "kill_step": scenario_kill_step,
    "kill_save": scenario_kill_save,
    "resume_kill_step": _resume("ck_kill_step"),
    "resume_kill_save": _resume("ck_kill_save"),
}


def main(argv):
    # run as a script from tests/: its sibling worker holds the scenario runner
    from test_train_worker import run_scenarios

    run_scenarios(argv, SCENARIOS)


if __name__ == "__main__":
    main(sys.argv[1:])
