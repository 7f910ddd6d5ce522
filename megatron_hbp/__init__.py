"""megatron-hbp: Hierarchical Balance Packing for long-context SFT on Megatron-Core.

Layers (imports only go downwards):
  megatron_hbp.kernels   Triton kernels + PyTorch references (torch/triton only)
  megatron_hbp.data      chat JSONL, tokenizers, templates, sample info (no torch)
  megatron_hbp.planner   groups, packing, balancing, plan files (pure NumPy)
  megatron_hbp.costmodel cost model, group selection, simulator (pure NumPy)
  megatron_hbp.mcore     the only package that imports megatron.core
"""

__version__ = "0.1.0"


def load_plan(path, **kwargs):
    """Read a saved plan; ``fingerprint=`` / ``lengths=`` check it against sample info
    (see ``megatron_hbp.planner.load_plan``)."""
    from megatron_hbp.planner import load_plan as _load_plan

    return _load_plan(path, **kwargs)
