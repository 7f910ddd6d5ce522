"""Cost model's context-parallel terms for the two CP implementations (``TrainingSetup.cp_impl``).

* ``allgather`` communication equals ``megatron_hbp.cp.cp_comm_bytes`` (what the trainer logs as
  ``cp_comm_bytes_per_rank``) exactly, over tokens, KV heads, head dim, CP, TP, layers, recompute
  and dtype;
* ring vs allgather communication, exposed time and activation memory by hand for a small model;
* the allgather attention term against the bytes ``megatron_hbp.cp.cp_attention_local`` really
  saves for backward on its varlen (CUDA) path, measured on CPU with
  ``torch.autograd.graph.saved_tensors_hooks``: only the flash kernel's arithmetic is replaced by
  a CPU kernel registered for torch's own ``torch_attn::_varlen_attn`` op, so torch's autograd
  registration decides what is saved (query, key, value, cu_seq_q, cu_seq_k, out, lse, rng).

Small model ("mini", as in tests/test_costmodel.py): L=2, h=64, f=176, a=4, g=2, d=16, V=1000;
q = a d = 64, kv = g d = 32.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np
import pytest
import torch

from megatron_hbp.configio import ConfigError
from megatron_hbp.costmodel import CostModel, TrainingSetup
from megatron_hbp.cp import cp_attention_local, cp_comm_bytes
from megatron_hbp.model_config import ModelConfig

# The round-number model, GPU and efficiencies of the hand-computed cost-model tests.
from tests.test_costmodel import MINI, UNIT_EFF, UNIT_GPU  # noqa: E402


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
    # allgather: all-gather per forward (L + k), reduce-scatter per backward (L)
    assert ag.cp_comm_bytes_per_rank(1600, 4, 0) == 4 * 153600 == 614400
    assert ag.cp_comm_bytes_per_rank(1600, 4, 1) == 5 * 153600
    # fp32 activations send fp32 K/V
    assert mini("allgather", activation_bytes=4).cp_comm_bytes_per_rank(1600, 4, 0) == 2 * 614400
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
    assert comm[0] == pytest.approx(614400 / 1e9)
    # with overlap the ring hides behind attention; megatron_hbp.cp's blocking all-gather and
    # reduce-scatter cannot
    _, comm = mini("ring", overlap_cp_comm=True).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == 0.0
    _, comm = mini("allgather", overlap_cp_comm=True).microbatch_breakdown([1600], pairs, 4, 0)
    assert comm[0] == pytest.approx(614400 / 1e9)
    # a third of the attention: forward phases expose 153.6 - 54.6 us, backward 307.2 - 136.6 us
    short = np.array([[200_000] * 4])
    fwd = 200_000 * 256 / 0.93696e12
    _, comm = mini("ring", overlap_cp_comm=True).microbatch_breakdown([1600], short, 4, 0)
    assert comm[0] == pytest.approx(2 * (153.6e-6 - fwd) + 2 * (307.2e-6 - 2.5 * fwd))
    # the calibration components use the same unit counts
    assert mini("allgather").time_components([1600], pairs, 4, 1).comm[0] == pytest.approx(5 * 153600 / 1e9)
    assert mini("ring").time_components([1600], pairs, 4, 1).comm[0] == pytest.approx(7 * 153600 / 1e9)


def test_activation_memory_ring_vs_allgather_by_hand():
    ring, ag = mini("ring"), mini("allgather")
    # attention part per local token (bf16, t = 1): q 2*64 + k, v 2*2*32 + output 2*64 + fp32 LSE 4*4
    assert ring.attention_bytes_per_token(4) == 128 + 128 + 128 + 16 == 400
    # allgather, one document of 1600 tokens on CP 4 (s = 200): rank r attends chunk r to keys
    # [0, (r+1) s) and chunk 7-r to [0, (8-r) s): 9 s = 1800 keys, K and V 1800*32*2 B each =
    # 230400 B over 400 local tokens = 576 B per token instead of 128; output saved twice
    # (kernel's out + output projection's input): + 128.
    assert ag.attention_bytes_per_token(4) == 128 + 576 + 128 + 128 + 16 == 976
    assert ag.attention_bytes_per_token(1) == 400  # no CP, nothing gathered
    assert ring.full_layer_bytes_per_token(4) == 1968  # tests/test_costmodel.py's hand value
    assert ag.full_layer_bytes_per_token(4) == 1968 + 576
    # K/V expanded to the 4 query heads before the kernel: k, v 2*2*64 per key
    ex = mini("allgather", attention_expand_kv=True)
    assert ex.attention_bytes_per_token(4) == 128 + 9 * 200 * 2 * 64 * 2 / 400 + 128 + 128 + 16 == 1552

    # peak activations of a 1600-token pack on CP 4 (400 tokens per GPU): 2 full layers +
    # final-norm/output inputs 3 * 2h = 384 B per token
    m_ring, m_ag = ring.memory(1600, 4, 0), ag.memory(1600, 4, 0)
    assert m_ring.activations == 400 * (2 * 1968 + 384)
    assert m_ag.activations == 400 * (2 * 2544 + 384)
    assert m_ag.activations - m_ring.activations == 2 * 400 * 576
    # one recomputed layer: 1 full + its input (128 per token) + 1 re-materialised full
    assert ag.memory(1600, 4, 1).activations == 400 * (2544 + 128 + 2544 + 384)
    # all recomputed: only the re-materialised layer keeps gathered K/V
    assert ag.memory(1600, 4, 2).activations - ring.memory(1600, 4, 2).activations == 400 * 576
    # transient gather buffers are the same term for both; CP 1 identical
    assert m_ag.cp_buffers == m_ring.cp_buffers == 2 * 1600 * 2 * 32 * 2
    assert ag.memory(1600, 1, 0).total == ring.memory(1600, 1, 0).total


def test_allgather_needs_more_recompute_for_8b_at_128k():
    # LLaMA-3.1-8B, 128K pack on CP 8, 80 GB H100: per non-recomputed layer the allgather path
    # keeps (8 - 1/2) * 2 * 1024 * 2 + 4096 * 2 = 38912 B per local token more (608 MiB for
    # 16384 tokens).
    ring = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32, setup=TrainingSetup(cp_impl="ring"))
    ag = CostModel("llama3_1_8b", "h100_sxm", num_gpus=32, setup=TrainingSetup(cp_impl="allgather"))
    assert ag.full_layer_bytes_per_token(8) - ring.full_layer_bytes_per_token(8) == 38912
    k_ring, k_ag = ring.min_recompute_layers(131072, 8), ag.min_recompute_layers(131072, 8)
    assert k_ring is not None and k_ag is not None and k_ag >= k_ring
    assert ag.memory(131072, 8, k_ag).total <= ag.hardware.memory_bytes
    if k_ag > 0:
        assert ag.memory(131072, 8, k_ag - 1).total > ag.hardware.memory_bytes
    # bytes per rank per micro-batch: 7 * 64 MiB per layer and pass; 96 vs 64 units
    assert ring.cp_comm_bytes_per_rank(131072, 8) == 96 * 7 * 64 * 2**20
    assert ag.cp_comm_bytes_per_rank(131072, 8) == 64 * 7 * 64 * 2**20


def test_cp_impl_validation():
    with pytest.raises(ConfigError, match="cp_impl must be one of ring, allgather"):
        TrainingSetup(cp_impl="p2p")
    assert TrainingSetup().cp_impl == "ring"


# --------------------------------------------------------------------------------------------
# (3) measured saved-for-backward bytes of cp_attention_local's varlen path


_ACTIVE = {"on": False}


def _cpu_varlen_kernel(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    is_causal=False,
    scale=None,
    window_size=None,
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """Flash-attention varlen forward on CPU: out [nq, hq, d] (query dtype), fp32 LSE [hq, nq]."""
    if not _ACTIVE["on"]:
        raise NotImplementedError("torch_attn::_varlen_attn has no CPU kernel outside this test")
    hq = query.shape[1]
    rep = hq // key.shape[1]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    out = torch.zeros_like(query)
    lse = torch.zeros(hq, query.shape[0], dtype=torch.float32)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    for i in range(len(cq) - 1):
        q = query[cq[i] : cq[i + 1]].float()
        k = key[ck[i] : ck[i + 1]].float().repeat_interleave(rep, 1)
        v = value[ck[i] : ck[i + 1]].float().repeat_interleave(rep, 1)
        nq, nk = q.shape[0], k.shape[0]
        s = torch.einsum("qhd,khd->hqk", q, k) * scale
        if is_causal:  # bottom-right aligned, as flash attention for nq < nk
            mask = torch.arange(nk)[None, :] <= (torch.arange(nq) + nk - nq)[:, None]
            s = s.masked_fill(~mask, float("-inf"))
        lse[:, cq[i] : cq[i + 1]] = torch.logsumexp(s, -1)
        out[cq[i] : cq[i + 1]] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(query.dtype)
    return out, lse, torch.zeros(2, dtype=torch.uint64)


@contextlib.contextmanager
def _varlen_on_cpu(monkeypatch, has_gqa: bool):
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    if has_gqa and "enable_gqa" not in inspect.signature(varlen.varlen_attn).parameters:
        pytest.skip(
            "this torch's varlen_attn has no enable_gqa (torch 2.11): the repeat path is the one used"
        )
    import megatron_hbp.cp.attention as cpa

    op = varlen._varlen_attn
    if "cpu" not in getattr(op, "_backend_fns", {}):
        op.register_kernel("cpu", _cpu_varlen_kernel)
    monkeypatch.setattr(cpa, "_pick_backend", lambda backend, q: "varlen")
    monkeypatch.setattr(cpa, "_varlen_has_gqa", lambda: has_gqa)
    _ACTIVE["on"] = True
    try:
        yield
    finally:
        _ACTIVE["on"] = False


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
    "lengths, cp, has_gqa",
    [
        ([64, 40, 24], 4, True),  # every document a multiple of 2c: (1 + 1/2c) exactly
        ([61, 37, 22], 4, True),  # padded documents (< 2c each): fewer keys than the bound
        ([96, 32], 2, True),
        ([64, 40, 24], 4, False),  # torch without enable_gqa: K/V expanded to query heads
    ],
)
def test_allgather_attention_term_matches_saved_tensors(monkeypatch, lengths, cp, has_gqa):
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
        setup=TrainingSetup(cp_impl="allgather", activation_bytes=4, attention_expand_kv=not has_gqa),
    )
    cu_pad, cu_real = _layout(lengths, cp)
    padded = not torch.equal(cu_pad, cu_real)
    t_pack = int(cu_pad[-1])
    t_local = t_pack // cp
    g = torch.Generator().manual_seed(0)
    k_all = torch.randn(t_pack, hkv, d, generator=g, requires_grad=True)
    v_all = torch.randn(t_pack, hkv, d, generator=g, requires_grad=True)
    w_proj = torch.randn(hq * d, hq * d, generator=g, requires_grad=True)
    model_bytes = t_local * cm.attention_bytes_per_token(cp)
    with _varlen_on_cpu(monkeypatch, has_gqa):
        for rank in range(cp):
            q = torch.randn(t_local, hq, d, generator=g, requires_grad=True)

            def layer(q=q, rank=rank):
                o = cp_attention_local(q, k_all, v_all, cu_pad, cu_real, cp, rank, backend="varlen")
                return o.reshape(t_local, hq * d) @ w_proj  # output projection saves its input

            out, floats, ints = _saved_bytes(layer, exclude=[w_proj])
            assert out.shape == (t_local, hq * d)
            # floats: q rows, K/V rows, kernel out, fp32 LSE, projection input; ints: the plan's
            # int64 q/k indices, cu_seqlens, rng state (cached, shared by layers: not modelled)
            assert floats + ints == pytest.approx(model_bytes, rel=0.20), (rank, floats, ints, model_bytes)
            if padded:  # the model counts padded keys and queries: an upper bound
                assert floats <= model_bytes
            else:  # every saved float tensor has the modelled shape
                assert floats == model_bytes, (rank, floats, model_bytes)
    # and the ring term (local K/V only) would be far off: the difference is the gathered K/V
    ring_bytes = t_local * cm.with_setup(cp_impl="ring").attention_bytes_per_token(cp)
    assert ring_bytes < 0.8 * model_bytes
