"""Worker of tests/cp/test_cp_equivalence.py (not a test module: it holds no tests).

Run as ``python tests/cp/test_cp_equivalence_worker.py WORKDIR PLAN:NAME:TP ...`` (one process)
or as 4 ranks (``tests.distributed.run_ranks``, or ``torchrun --nproc-per-node 4``): each job trains the model of ``WORKDIR/model.yaml``
on ``WORKDIR/PLAN`` with tensor parallel size TP through the trainer's public ``run``.
Saved: ``NAME.json`` (the step records, rank 0) and ``NAME_rank{r}.pt`` for the ranks of the
first data x context index (``r < TP``): per step, the reduced gradients and the weights
before that step's update (this rank's TP shards). Only stdlib imports at module level:
pytest imports this file while collecting.
"""

import json
import sys
from pathlib import Path


def main(argv):
    """argv: WORKDIR JOB... with JOB = ``PLAN_FILE:NAME:TP[:CP_BACKEND]`` (several runs share one launch)."""
    work = Path(argv[0])
    import torch

    from megatron_hbp.mcore.config import DataConfig, OptimizerConfig, ParallelConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import init_distributed, run

    torch.set_num_threads(1)
    rank, _, _ = init_distributed()
    for job in argv[1:]:
        plan_file, name, tp, *backend = job.split(":")
        cfg = TrainConfig(
            model=str(work / "model.yaml"),
            data=DataConfig(sample_info=str(work / "info.npz"), num_workers=0),
            plan=PlanSource(path=str(work / plan_file)),
            # No warm-up: every step (the first included) updates with a nonzero learning rate.
            # adam_eps 1e-4: Adam's first update is lr * g / (|g| + eps), whose slope lr / eps
            # amplifies fp32 rounding of near-zero gradient entries by 1e5 at eps = 1e-8 (measured:
            # 1.2e-5 relative weight error after step 0 while all gradients agreed within 1e-5); at 1e-4 the
            # amplification is <= 10 and the weights are compared at the 1e-5 tolerance.
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0, clip_grad=1.0, adam_eps=1e-4),
            parallel=ParallelConfig(tp=int(tp)),
            dtype="fp32",
            attention_backend="sdpa",
            cp_backend=backend[0] if backend else "auto",
        )
        steps: dict = {}

        def on_grads(step, model, steps=steps):
            steps[step] = {
                "grads": {
                    n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
                    for n, p in model.module.named_parameters()
                },
                "weights_before": {n: p.detach().clone() for n, p in model.module.named_parameters()},
            }

        records = run(cfg, on_grads=on_grads)
        if rank < int(tp):
            torch.save({"steps": steps}, work / f"{name}_rank{rank}.pt")
        if rank == 0:
            (work / f"{name}.json").write_text(json.dumps(records, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
