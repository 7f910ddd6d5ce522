"""Packed THD attention: backends against an explicit fp64 reference, document isolation, RoPE."""

import math

import pytest
import torch

from megatron_hbp.mcore.attention import (
    HBPPackedSeqParams,
    PackedCoreAttention,
    RopeSpec,
    apply_rope,
    packed_attention,
    resolve_backend,
    rope_inv_freq,
    select_backend,
)

LENGTHS = [5, 1, 9, 3]  # includes a 1-token document
HQ, HKV, D = 4, 2, 8


def _qkv(seed=0, lengths=LENGTHS, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, HQ, D, generator=g, dtype=dtype)
    k = torch.randn(t, HKV, D, generator=g, dtype=dtype)
    v = torch.randn(t, HKV, D, generator=g, dtype=dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def reference(q, k, v, lengths):
    """Explicit masked softmax per document, fp64, GQA by head grouping (query head h -> kv h // 2)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    start = 0
    for n in lengths:
        for h in range(q.shape[1]):
            qd = q[start : start + n, h].double()
            kd = k[start : start + n, h // (q.shape[1] // k.shape[1])].double()
            vd = v[start : start + n, h // (q.shape[1] // k.shape[1])].double()
            s = qd @ kd.T / math.sqrt(q.shape[-1])
            s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            out[start : start + n, h] = torch.softmax(s, -1) @ vd
        start += n
    return out


def test_sdpa_matches_reference_forward_and_backward():
    q, k, v, cu = _qkv()
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = packed_attention(q, k, v, cu, LENGTHS, backend="sdpa")
    ref = reference(q, k, v, LENGTHS)
    assert (out.double() - ref).abs().max() < 1e-5
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference(qd, kd, vd, LENGTHS), (qd, kd, vd), go.double())
    for a, b in zip(grads, ref_grads):
        assert (a.double() - b).abs().max() < 1e-5


def test_document_isolation():
    q, k, v, cu = _qkv()
    base = packed_attention(q, k, v, cu, LENGTHS, backend="sdpa")
    # perturb every q/k/v of document 2 (tokens 6..14)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    sl = slice(6, 15)
    for x in (q2, k2, v2):
        x[sl] += torch.randn_like(x[sl])
    out = packed_attention(q2, k2, v2, cu, LENGTHS, backend="sdpa")
    assert torch.equal(out[:6], base[:6]) and torch.equal(out[15:], base[15:])
    assert not torch.allclose(out[sl], base[sl])


def test_causal_within_document():
    q, k, v, cu = _qkv()
    base = packed_attention(q, k, v, cu, LENGTHS, backend="sdpa")
    # changing the last token of document 0 changes only that token's output
    k2, v2 = k.clone(), v.clone()
    k2[4] += 1.0
    v2[4] += 1.0
    out = packed_attention(q, k2, v2, cu, LENGTHS, backend="sdpa")
    assert torch.equal(out[:4], base[:4]) and torch.equal(out[5:], base[5:])
    assert not torch.allclose(out[4], base[4])


def test_trailing_padding_does_not_change_real_tokens():
    q, k, v, cu = _qkv(lengths=[5, 4])
    real = packed_attention(q, k, v, cu, [5, 4], backend="sdpa")
    # pad document 0 with 3 garbage tokens at its end (a padded span, as for CP)
    g = torch.Generator().manual_seed(3)
    pads = [torch.randn(3, x.shape[1], D, generator=g) for x in (q, k, v)]
    qp, kp, vp = (torch.cat([x[:5], p, x[5:]]) for x, p in zip((q, k, v), pads))
    cu_p = torch.tensor([0, 8, 12], dtype=torch.int32)
    out = packed_attention(qp, kp, vp, cu_p, [8, 4], backend="sdpa")
    assert torch.allclose(out[:5], real[:5], atol=1e-6) and torch.allclose(out[8:], real[5:], atol=1e-6)


def test_backend_selection_and_errors():
    assert select_backend("auto", "cpu") == "sdpa"
    assert select_backend("sdpa") == "sdpa"
    with pytest.raises(ValueError, match="unknown"):
        select_backend("flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            select_backend("varlen")
        with pytest.raises(ValueError, match="needs CUDA"):
            select_backend("te")
    with pytest.raises(ValueError, match="sum to"):
        q, k, v, cu = _qkv()
        packed_attention(q, k, v, cu, [5, 1, 9], backend="sdpa")


@pytest.mark.parametrize(
    "on_cuda,dtype,te,varlen,expected",
    [
        (True, torch.float32, True, True, "sdpa"),  # fp32: no flash/fused kernel takes it
        (True, torch.float32, False, True, "sdpa"),
        (True, torch.bfloat16, True, True, "te"),
        (True, torch.bfloat16, False, True, "varlen"),
        (True, torch.float16, False, True, "varlen"),
        (True, torch.bfloat16, False, False, "sdpa"),
        (False, torch.bfloat16, True, True, "sdpa"),  # not on CUDA
    ],
)
def test_auto_backend_rule(on_cuda, dtype, te, varlen, expected):
    got = resolve_backend("auto", on_cuda=on_cuda, dtype=dtype, te_available=te, varlen_available=varlen)
    assert got == expected


def test_explicit_half_only_backend_with_fp32_is_a_clear_error():
    env = dict(on_cuda=True, te_available=True, varlen_available=True)
    for name in ("varlen", "te"):
        with pytest.raises(ValueError, match="needs fp16/bf16 activations.*attention_backend: sdpa"):
            resolve_backend(name, dtype=torch.float32, **env)
        assert resolve_backend(name, dtype=torch.bfloat16, **env) == name
    assert resolve_backend("sdpa", dtype=torch.float32, **env) == "sdpa"


def test_llama3_inv_freq_matches_megatron():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    head_dim = 128
    spec = RopeSpec(theta=500000.0, scaling_factor=8.0)
    base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    meg = RotaryEmbedding._apply_scaling(None, base, factor=8.0)
    ours = rope_inv_freq(head_dim, spec)
    assert torch.allclose(ours, meg, rtol=1e-6, atol=0)
    assert not torch.allclose(ours, base)  # scaling did something
    assert torch.allclose(rope_inv_freq(head_dim, RopeSpec(theta=500000.0)), base, rtol=1e-6)


def test_rope_matches_megatron_and_is_relative():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    inv = rope_inv_freq(D, RopeSpec(theta=10000.0))
    x = torch.randn(6, 2, D, dtype=torch.float64).float()
    pos = torch.arange(6)
    freqs = torch.cat([pos[:, None].float() * inv[None]] * 2, -1)[:, None, None, :]  # [s, 1, 1, d]
    meg = _apply_rotary_pos_emb_bshd(x[:, None], freqs).squeeze(1)
    assert torch.allclose(apply_rope(x, pos, inv), meg, atol=1e-6)
    # <R(p) q, R(p') k> depends only on p - p'
    q, k = torch.randn(1, 1, D), torch.randn(1, 1, D)
    dots = [
        (apply_rope(q, torch.tensor([p + 3]), inv) * apply_rope(k, torch.tensor([p]), inv)).sum().item()
        for p in (0, 7, 100)
    ]
    assert max(dots) - min(dots) < 1e-4


def test_core_attention_module_applies_rope_per_document():
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            use_cpu_initialization=True)  # fmt: skip
    mod = PackedCoreAttention(cfg, layer_number=1, rope=RopeSpec(theta=10000.0), backend="auto")
    q, k, v, cu = _qkv()
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    params = HBPPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
        max_seqlen_q=9, max_seqlen_kv=9, position_ids=pos, padded_lengths_host=LENGTHS, lengths_host=LENGTHS,
    )  # fmt: skip
    out = mod(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(LENGTHS), HQ * D)
    inv = rope_inv_freq(D, RopeSpec(theta=10000.0))
    # document 2 alone, positions from 0: the same as inside the pack
    sl = slice(6, 15)
    alone = reference(apply_rope(q[sl], pos[sl], inv), apply_rope(k[sl], pos[sl], inv), v[sl], [9])
    assert (out[sl].reshape(9, HQ, D).double() - alone).abs().max() < 1e-5
    with pytest.raises(ValueError, match="HBPPackedSeqParams"):
        mod(q, k, v, None, packed_seq_params=None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_varlen_matches_sdpa_on_gpu():
    lengths = [700, 33, 1, 2000, 129]
    q, k, v, cu = _qkv(lengths=lengths)
    q, k, v = (x.cuda().to(torch.bfloat16).requires_grad_(True) for x in (q, k, v))
    outs = {}
    for backend in ("sdpa", "varlen") + (("te",) if select_backend("auto") == "te" else ()):
        out = packed_attention(q, k, v, cu.cuda(), lengths, backend=backend)
        g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        outs[backend] = (out.float(), [x.float() for x in g])
    ref = reference(q.detach().float().cpu(), k.detach().float().cpu(), v.detach().float().cpu(), lengths)
    err_sdpa = (outs["sdpa"][0].cpu().double() - ref).abs().max().item()
    for backend, (out, grads) in outs.items():
        err = (out.cpu().double() - ref).abs().max().item()
        assert err <= max(2 * err_sdpa, 1e-2), (backend, err, err_sdpa)
        for a, b in zip(grads, outs["sdpa"][1]):
            assert (a - b).abs().max().item() <= 5e-2 * b.abs().max().item() + 1e-2, backend
