"""Cost model's context-parallel terms for the two CP implementations (``TrainingSetup.cp_impl``).

* ``allgather`` communication equals ``megatron_hbp.cp.cp_comm_bytes`` (what the trainer logs as
  ``cp_comm_bytes_per_rank``) exactly, over tokens, KV heads, head dim, CP, TP, layers, recompute
  and dtype;
* ring vs allgather communication, exposed time and activation memory by hand for a small model;
* the allgather attention term against the bytes the all-gather path (``cp_attention`` with
  autograd: local q, k, v kept, attention recomputed in backward) really saves, measured with
  ``torch.autograd.graph.saved_tensors_hooks``;
* ulysses: communication, memory and the exact 1/c attention split by hand.

Small model ("mini", as in tests/costmodel/test_costmodel.py): L=2, h=64, f=176, a=4, g=2, d=16, V=1000;
q = a d = 64, kv = g d = 32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel import CostModel, TrainingSetup
from megatron_hbp.cp import cp_comm_bytes
from megatron_hbp.model_config import ModelConfig

# The round-number model, GPU and efficiencies of the hand-computed cost-model tests.
from tests.costmodel.test_costmodel import MINI, UNIT_EFF, UNIT_GPU  # noqa: E402


def mini(cp_impl="ring", num_gpus=8, **setup):
    return CostModel(
        MINI,
        UNIT_GPU,
        num_gpus=num_gpus,
        setup=TrainingSetup(cp_impl=cp_impl, overlap_dp_comm=False, **setup),
        efficiency=UNIT_EFF,
    )


# --------------------------------------------------------------------------------------------
# (1) allgather bytes == megatron_hbp.cp.cp_comm_bytes


@pytest.mark.parametrize(
    "layers, heads, kv_heads, head_dim, tp, tokens, cp, recompute, dtype_bytes",
    [
        (2, 4, 2, 16, 1, 1600, 4, 0, 2),
        (2, 4, 2, 16, 1, 1600, 4, 2, 2),
        (32, 32, 8, 128, 1, 131072, 8, 0, 2),  # LLaMA-3.1-8B shapes, 128K pack at CP 8
        (32, 32, 8, 128, 1, 131072, 8, 28, 2),
        (32, 32, 8, 128, 2, 65536, 4, 7, 2),  # TP 2: 4 KV heads per rank
        (80, 64, 8, 128, 4, 98304, 8, 80, 2),  # 70B shapes, TP 4 (2 KV heads per rank)
        (3, 6, 3, 24, 3, 1806, 3, 1, 4),  # odd CP degree, fp32, TP 3
        (4, 8, 1, 64, 1, 4096, 2, 3, 4),  # MQA
    ],
)
def test_allgather_bytes_equal_cp_comm_bytes(
    layers, heads, kv_heads, head_dim, tp, tokens, cp, recompute, dtype_bytes
):
    m = ModelConfig(
        name="case",
        num_layers=layers,
        hidden_size=heads * head_dim,
        ffn_hidden_size=4 * heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        vocab_size=1000,
    )
    cm = CostModel(
        m,
        UNIT_GPU,
        num_gpus=8 * tp,
        setup=TrainingSetup(cp_impl="allgather", tensor_parallel=tp, activation_bytes=dtype_bytes),
    )
    want = cp_comm_bytes(
        tokens,
        kv_heads // tp,  # KV heads on one TP rank
        head_dim,
        cp,
        num_layers=layers,
        recompute_layers=recompute,
        dtype_bytes=dtype_bytes,
    )
    assert want > 0
    assert cm.cp_comm_bytes_per_rank(tokens, cp, recompute) == want
    # several micro-batches at once, and CP 1 sends nothing in both
    packs = np.array([tokens, 2 * tokens])
    np.testing.assert_array_equal(cm.cp_comm_bytes_per_rank(packs, cp, recompute), [want, 2 * want])
    assert cm.cp_comm_bytes_per_rank(tokens, 1, recompute) == 0
    assert cp_comm_bytes(tokens, kv_heads // tp, head_dim, 1, num_layers=layers) == 0


# --------------------------------------------------------------------------------------------
# (2) hand-computed ring vs allgather


def test_comm_bytes_ring_vs_allgather_by_hand():
    # pack of 1600 tokens on CP 4: each rank holds 400 tokens; its K+V block is
    # 2 * 400 * kv 32 * 2 B = 51200 B, sent to the 3 other ranks: B = 153600 B per layer and pass.
    ring, ag = mini("ring"), mini("allgather")
    assert ring.cp_bytes_per_layer(1600, 4) == 153600
    assert ag.cp_bytes_per_layer(1600, 4) == 153600
    # ring: fwd K/V (L) + bwd K/V and dK/dV (2L) + recomputed forwards (k): 3*2 + k units
    assert ring.cp_comm_bytes_per_rank(1600, 4, 0) == 6 * 153600 == 921600
    assert ring.cp_comm_bytes_per_rank(1600, 4, 1) == 7 * 153600
    # allgather: all-gather per forward (L + k), all-gather again + reduce-scatter per backward (2L)
    assert ag.cp_comm_bytes_per_rank(1600, 4, 0) == 6 * 153600 == 921600
    assert ag.cp_comm_bytes_per_rank(1600, 4, 1) == 7 * 153600
    # fp32 activations send fp32 K/V
    assert mini("allgather", activation_bytes=4).cp_comm_bytes_per_rank(1600, 4, 0) == 2 * 921600
    # ulysses, CP 2: per layer and pass, 1/2 of the local q|k|v (64 + 2*32 per token) and output
    # (64) of 800 tokens, bf16: 0.5 * 800 * (2*64 + 2*32) * 2 B = 153600 B; L forward + L backward
    # passes (+ k recomputed forwards)
    uly = mini("ulysses")
    assert uly.cp_comm_bytes_per_rank(1600, 2, 0) == 4 * 153600
    assert uly.cp_comm_bytes_per_rank(1600, 2, 1) == 5 * 153600
    # CP 4 > 2 K/V heads: each rank receives 1 K/V head (16 values) — 4 copies in all instead of 2:
    # 0.75 * 400 * (2*64 + 2*16*4) * 2 B = 153600 B per pass
    assert uly.cp_comm_bytes_per_rank(1600, 4, 0) == 4 * 153600
    with pytest.raises(ValueError, match="recompute_layers"):
        ag.cp_comm_bytes_per_rank(1600, 4, 3)


def test_comm_time_ring_vs_allgather_by_hand():
    # 600000 pairs per rank: one layer's forward attention takes 600000 * 256 / 0.93696e12 =
    # 163.9 us > 153.6 us of one K/V exchange, so the ring can hide every phase
    pairs = np.array([[600_000] * 4])
    no_overlap = {"overlap_cp_comm": False}
    # 1 GB/s NVLink, efficiency 1: seconds = bytes / 1e9
    _, comm = mini("ring", **no_overlap).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == pytest.approx(921600 / 1e9)
    _, comm = mini("allgather", **no_overlap).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == pytest.approx(921600 / 1e9)
    _, comm = mini("ulysses", overlap_cp_comm=True).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == pytest.approx(4 * 153600 / 1e9)  # the all-to-alls block: never hidden
    # with overlap the ring hides behind attention; megatron_hbp.cp's blocking all-gather and
    # reduce-scatter cannot
    _, comm = mini("ring", overlap_cp_comm=True).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == 0.0
    _, comm = mini("allgather", overlap_cp_comm=True).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == pytest.approx(921600 / 1e9)
    # a third of the attention: forward phases expose 153.6 - 54.6 us, backward 307.2 - 136.6 us
    short = np.array([[200_000] * 4])
    fwd = 200_000 * 256 / 0.93696e12
    _, comm = mini("ring", overlap_cp_comm=True).microbatch_breakdown([1600], short, 4, 0)
    assert comm[0] == pytest.approx(2 * (153.6e-6 - fwd) + 2 * (307.2e-6 - 2.5 * fwd))
    # the calibration components use the same unit counts
    assert mini("allgather").time_components([1600], pairs, 4, 1).comm[0] == pytest.approx(7 * 153600 / 1e9)
    assert mini("ring").time_components([1600], pairs, 4, 1).comm[0] == pytest.approx(7 * 153600 / 1e9)


def test_activation_memory_ring_allgather_ulysses_by_hand():
    ring, ag, uly = mini("ring"), mini("allgather"), mini("ulysses")
    # attention part per local token (bf16, t = 1): q 2*64 + k, v 2*2*32 + output 2*64 + fp32 LSE 4*4
    assert ring.attention_bytes_per_token(4) == 128 + 128 + 128 + 16 == 400
    # allgather keeps only the local q, k, v (the backward re-gathers and recomputes) and the output
    # projection's input: no LSE, no gathered K/V, expanded or not
    assert ag.attention_bytes_per_token(4) == 128 + 128 + 128 == 384
    assert mini("allgather", attention_expand_kv=True).attention_bytes_per_token(4) == 384
    assert ag.attention_bytes_per_token(1) == 400  # no CP
    # ulysses on CP 4 > 2 K/V heads: the kernel's q (128), output (128) and LSE (4 heads / 4 ranks
    # = 1 head over 4x the tokens: 16 per local token), plus K/V of 1 head per rank over the whole
    # pack = 4 * 2 * 16 * 2 = 256 per local token (replicated), plus the local output again (128)
    assert uly.attention_bytes_per_token(4) == 128 + 128 + 16 + 256 + 128 == 656
    # CP 2: the 2 K/V heads split 1 per rank: K/V = 2 * 2 * 32 = 128 per local token, as without CP
    assert uly.attention_bytes_per_token(2) == 128 + 128 + 16 + 128 + 128 == 528
    # transient buffers: ulysses 3 copies of the local q|k|v (400 tokens, (64 + 2*64) values, bf16)
    assert uly.memory(1600, 4, 0).cp_buffers == 3 * 400 * (64 + 2 * 64) * 2
    assert ag.memory(1600, 4, 0).cp_buffers == ring.memory(1600, 4, 0).cp_buffers == 2 * 1600 * 2 * 32 * 2
    assert ag.memory(1600, 1, 0).total == ring.memory(1600, 1, 0).total == uly.memory(1600, 1, 0).total


def test_ulysses_divides_attention_exactly():
    # zigzag pairs of one micro-batch on CP 2 are unequal (padding, short documents); ulysses runs
    # whole documents on half the heads: both ranks do the mean
    pairs = np.array([[3000.0, 1000.0]])
    attn_ag = mini("allgather").time_components([800], pairs, 2, 0).attention
    attn_uly = mini("ulysses").time_components([800], pairs, 2, 0).attention
    attn_ring = mini("ring").time_components([800], pairs, 2, 0).attention
    assert attn_uly[0] == pytest.approx(attn_ring[0] * 2000 / 3000)
    # allgather recomputes the attention forward: (1 + 1 + 2.5) L / ((1 + 2.5) L) of the ring's
    assert attn_ag[0] == pytest.approx(attn_ring[0] * 4.5 / 3.5)


def test_paper_setting_fits_80gb_without_te():
    # LLaMA-3.1-8B, 128K pack on CP 8, 28 recomputed layers, 32 H100s, the trainer's own path
    # (unfused RoPE/SwiGLU/RMSNorm, fused loss, distributed optimizer as configs/llama3_1_8b_128k_hbp.yaml):
    # the tensors before the reserve fit 80 GB (the pre-fix all-gather path modelled 83.6 GiB)
    from megatron_hbp.mcore.train import trainer_cost_model  # noqa: PLC0415 - needs torch
    from megatron_hbp.model_config import load_model_config  # noqa: PLC0415

    m = load_model_config("llama3_1_8b")
    for impl, fits in (("ulysses", True), ("allgather", True)):
        cm = trainer_cost_model(
            m, world=32, attention_backend="varlen", cp_impl=impl, distributed_optimizer=True
        )
        mem = cm.memory(131072, 8, 28)
        assert (mem.total - mem.reserve <= 80e9) == fits, (impl, mem)


def test_cp_impl_validation():
    with pytest.raises(ConfigError, match="cp_impl must be one of ring, allgather, ulysses"):
        TrainingSetup(cp_impl="p2p")
    assert TrainingSetup().cp_impl == "ring"


# --------------------------------------------------------------------------------------------
# (3) measured saved-for-backward bytes of the all-gather path (Ulysses: tests/cp/test_cp_ulysses.py)


def _layout(real_lengths, cp):
    step = 2 * cp
    cu_real, cu_pad = [0], [0]
    for n in real_lengths:
        cu_real.append(cu_real[-1] + n)
        cu_pad.append(cu_pad[-1] + -(-n // step) * step)
    return torch.tensor(cu_pad, dtype=torch.int32), torch.tensor(cu_real, dtype=torch.int32)


def _saved_bytes(fn, exclude):
    """Run ``fn``; return (its result, bytes of the distinct floating-point storages autograd
    saved, bytes of the distinct integer ones), leaving out the storages in ``exclude`` (weights)."""
    storages: dict[int, tuple[int, bool]] = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = (st.nbytes(), t.is_floating_point())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {x.untyped_storage().data_ptr() for x in exclude}
    kept = [v for p, v in storages.items() if p not in skip]
    return out, sum(n for n, fp in kept if fp), sum(n for n, fp in kept if not fp)


@pytest.mark.parametrize(
    "lengths, cp, expand",
    [
        ([64, 40, 24], 4, False),  # every document a multiple of 2c
        ([61, 37, 22], 4, False),  # padded documents
        ([96, 32], 2, False),
        ([64, 40, 24], 4, True),  # K/V expansion for the kernel does not change what is kept
    ],
)
def test_allgather_attention_term_matches_saved_tensors(monkeypatch, lengths, cp, expand):
    """The all-gather path (``cp_attention`` with autograd) keeps exactly the local q, k, v; the
    collective is replaced by a stand-in that places this rank's K/V among fixed other shards."""
    import megatron_hbp.cp.attention as cpa  # noqa: PLC0415

    hq, hkv, d = 4, 2, 16
    model = ModelConfig(
        name="m",
        num_layers=1,
        hidden_size=hq * d,
        ffn_hidden_size=64,
        num_attention_heads=hq,
        num_query_groups=hkv,
        vocab_size=16,
    )
    cm = CostModel(
        model,
        UNIT_GPU,
        num_gpus=cp,
        setup=TrainingSetup(cp_impl="allgather", activation_bytes=4, attention_expand_kv=expand),
    )
    cu_pad, cu_real = _layout(lengths, cp)
    t_local = int(cu_pad[-1]) // cp
    g = torch.Generator().manual_seed(0)
    others = torch.randn(cp, t_local, 2, hkv, d, generator=g)
    w_proj = torch.randn(hq * d, hq * d, generator=g, requires_grad=True)
    model_bytes = t_local * cm.attention_bytes_per_token(cp)
    for rank in range(cp):

        def fake_gather(x, group, rank=rank):
            parts = [x if r == rank else others[r] for r in range(cp)]
            return torch.cat(parts, 0)

        monkeypatch.setattr(cpa, "gather_from_cp", fake_gather)
        q = torch.randn(t_local, hq, d, generator=g, requires_grad=True)
        k = torch.randn(t_local, hkv, d, generator=g, requires_grad=True)
        v = torch.randn(t_local, hkv, d, generator=g, requires_grad=True)

        def layer(q=q, k=k, v=v, rank=rank):
            o = cpa._AllGatherAttention.apply(q, k, v, cu_pad, cu_real, None, cp, rank, None, "sdpa")
            return o.reshape(t_local, hq * d) @ w_proj  # output projection saves its input

        out, floats, ints = _saved_bytes(layer, exclude=[w_proj])
        assert out.shape == (t_local, hq * d)
        assert ints == 0
        assert floats == model_bytes, (rank, floats, model_bytes)
        # and the gradients still arrive (recomputed in backward) and equal the direct graph's
        out.sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        o2 = cpa._gathered_attention(q, k, v, cu_pad, cu_real, None, cp, rank, None, "sdpa")
        (o2.reshape(t_local, hq * d) @ w_proj).sum().backward()
        for a_, b_ in zip(grads, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(a_, b_, rtol=1e-5, atol=1e-6)
