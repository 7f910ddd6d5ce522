"""Train a LLaMA-shaped model with Megatron-Core from an HBP plan.

    torchrun --nproc-per-node 2 examples/pretrain_llama_hbp.py --config configs/demo_tiny.yaml

Thin entry point: everything lives in ``megatron_hbp.mcore.train`` (see docs/training.md).
"""

import sys

from megatron_hbp.mcore.train import main

if __name__ == "__main__":
    sys.exit(main())
