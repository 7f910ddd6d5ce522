"""MFU ingredients: per-rank causal attention pairs and the FLOP count (hand-computed values)."""

from types import SimpleNamespace

from megatron_hbp.mcore.metrics import model_flops, rank_attention_pairs
from megatron_hbp.model_config import load_model_config


def test_rank_attention_pairs_cp1_and_zigzag_cp2():
    # cp 1: a document of n tokens has n (n + 1) / 2 causal pairs: 6 + 10
    assert rank_attention_pairs([SimpleNamespace(lengths=[3, 4], cp=1, cp_rank=0)]) == 16
    # cp 2, one 8-token document in 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    # Token at position p sees p + 1 keys: chunk pairs 3, 7, 11, 15 -> ranks 3 + 15 and 7 + 11.
    for rank in (0, 1):
        assert rank_attention_pairs([SimpleNamespace(lengths=[8], cp=2, cp_rank=rank)]) == 18
    # two micro-batches add up
    two = [SimpleNamespace(lengths=[3], cp=1, cp_rank=0), SimpleNamespace(lengths=[4], cp=1, cp_rank=0)]
    assert rank_attention_pairs(two) == 16
    # Ulysses: every rank of a cp 2 group runs whole documents on half the heads: 36 / 2 pairs
    # (lengths 5 and 3: 15 + 6 = 21 -> 10.5 whatever the rank), in all-head units
    for rank in (0, 1):
        assert rank_attention_pairs([SimpleNamespace(lengths=[8], cp=2, cp_rank=rank)], "ulysses") == 18
        assert rank_attention_pairs([SimpleNamespace(lengths=[5, 3], cp=2, cp_rank=rank)], "ulysses") == 10.5
    # cp 1 steps are the same whatever the CP backend
    assert rank_attention_pairs([SimpleNamespace(lengths=[3, 4], cp=1, cp_rank=0)], "ulysses") == 16


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
