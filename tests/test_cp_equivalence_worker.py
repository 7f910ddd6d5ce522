"""Worker of tests/test_cp_equivalence.py (not a test module: it holds no tests).

Run as ``python tests/test_cp_equivalence_worker.py WORKDIR PLAN NAME`` (one process) or
under ``torchrun --nproc-per-node 4``. Trains the model of ``WORKDIR/model.yaml`` on ``WORKDIR/PLAN`` through the
trainer's public ``run`` and, on rank 0, saves per step: the loss and group/cp (records), the
reduced gradients, and the weights before the step's update (``WORKDIR/NAME.pt``), plus the
weights after the last step (one extra hook-less step is not possible, so the last plan step
only contributes its loss and gradients). Only stdlib imports at module level: pytest
imports this file while collecting.
"""

import json
import sys
from pathlib import Path


def main(argv):
    work, plan_file, name = Path(argv[0]), argv[1], argv[2]
    import torch

    from megatron_hbp.mcore.config import DataConfig, OptimizerConfig, PlanSource, TrainConfig
    from megatron_hbp.mcore.train import init_distributed, run

    torch.set_num_threads(1)
    rank, _, _ = init_distributed()
    cfg = TrainConfig(
        model=str(work / "model.yaml"),
        data=DataConfig(sample_info=str(work / "info.npz"), num_workers=0),
        plan=PlanSource(path=str(work / plan_file)),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=1, clip_grad=1.0),
        dtype="fp32",
        attention_backend="sdpa",
    )
    steps: dict = {}

    def on_grads(step, model):
        steps[step] = {
            "grads": {
                n: (p.main_grad if getattr(p, "main_grad", None) is not None else p.grad).detach().clone()
                for n, p in model.module.named_parameters()
            },
            "weights_before": {n: p.detach().clone() for n, p in model.module.named_parameters()},
        }

    records = run(cfg, on_grads=on_grads)
    if rank == 0:
        torch.save({"steps": steps}, work / f"{name}.pt")
        (work / f"{name}.json").write_text(json.dumps(records, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
