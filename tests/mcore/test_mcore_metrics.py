"""MFU ingredients: the FLOP count and the peak (hand-computed values); the per-rank causal pairs
are the plan's workload (tests/planner/test_planner_workload.py)."""

from megatron_hbp.mcore.metrics import model_flops
from megatron_hbp.model_config import load_model_config


def test_model_flops_attention_and_dense_terms():
    cfg = load_model_config("tiny")
    heads, d, layers = cfg.num_attention_heads, cfg.head_dim, cfg.num_layers
    # attention only (no tokens): fwd 4 d + bwd 8 d FLOPs per pair, query head and layer
    assert model_flops(cfg, 0, 1000) == 12 * 1000 * heads * d * layers
    # tokens only: 6 FLOPs per parameter and token, input embedding excluded (a lookup)
    embed = cfg.vocab_size * cfg.hidden_size
    assert model_flops(cfg, 10, 0) == 6 * 10 * (cfg.num_parameters() - (0 if cfg.tie_embeddings else embed))


def test_peak_tflops_reads_the_hardware_profiles():
    from megatron_hbp.costmodel.hardware import load_hardware
    from megatron_hbp.mcore.metrics import peak_tflops

    # datasheet dense BF16 (no sparsity), the same number the cost model uses
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 == load_hardware("h100_sxm").bf16_dense_tflops
    assert peak_tflops("NVIDIA B200") == 2250.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A100-SXM4-40GB") is None  # no profile: no MFU rather than a guess
