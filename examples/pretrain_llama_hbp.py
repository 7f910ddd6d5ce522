"""Train a LLaMA-shaped model with Megatron-Core from an HBP plan.

    torchrun --nproc-per-node 2 examples/pretrain_llama_hbp.py --config configs/demo_tiny.yaml

Thin entry point over ``megatron_hbp.mcore.cli.main`` (see docs/training.md).
"""

import sys

from megatron_hbp.mcore.cli import main

if __name__ == "__main__":
    sys.exit(main())
