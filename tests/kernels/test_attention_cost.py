"""Tests of attention_cost: Triton kernel (interpreter on CPU, compiled on CUDA) and the
PyTorch reference, both against a token-level brute-force counter that knows nothing of
the closed form (it walks every query position of the padded zigzag layout)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_hbp.kernels import attention_cost, attention_cost_reference, attention_pairs_to_flops
from megatron_hbp.kernels.attention_cost.kernel import _attention_cost_triton

CUDA = torch.cuda.is_available()
# The Triton path: compiled on CUDA, interpreted on CPU (root conftest sets TRITON_INTERPRET).
DEVICE = "cuda" if CUDA else "cpu"
CPS = [1, 2, 3, 4, 8]


def brute_force(lengths: list[int], offsets: list[int], cp: int) -> list[list[int]]:
    """Token-level count: pad, cut into 2cp chunks, give each real query its q+1 keys."""
    out = [[0] * cp for _ in range(len(offsets) - 1)]
    for p in range(len(offsets) - 1):
        for d in range(offsets[p], offsets[p + 1]):
            length = lengths[d]
            padded = -(-length // (2 * cp)) * (2 * cp)
            chunk = padded // (2 * cp)
            for q in range(length):
                c = q // chunk
                rank = c if c < cp else 2 * cp - 1 - c
                out[p][rank] += q + 1
    return out


def random_case(rng: random.Random, num_packs: int, max_docs: int, max_len: int):
    lengths, offsets = [], [0]
    for _ in range(num_packs):
        n = rng.choice([0, 1, rng.randint(0, max_docs)])
        lengths += [rng.choice([1, 2, rng.randint(0, max_len)]) for _ in range(n)]
        offsets.append(len(lengths))
    return lengths, offsets


def run(lengths, offsets, cp, backend, dtype=torch.int64, device=DEVICE):
    lt = torch.tensor(lengths, dtype=dtype, device=device)
    ot = torch.tensor(offsets, dtype=dtype, device=device)
    return attention_cost(lt, ot, cp, backend=backend).cpu()


@pytest.mark.parametrize("cp", CPS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_brute_force_random(cp, backend):
    rng = random.Random(1000 + cp)
    # 300 packs: several programs of the default block, a partial last block.
    lengths, offsets = random_case(rng, num_packs=300, max_docs=6, max_len=70)
    device = DEVICE if backend == "triton" else "cpu"
    got = run(lengths, offsets, cp, backend, device=device)
    assert got.dtype == torch.int64 and tuple(got.shape) == (300, cp)
    assert got.tolist() == brute_force(lengths, offsets, cp)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_hand_computed_small(dtype):
    # Lengths 1 and 5 (pack 0), empty pack 1, lengths 7, 0, 16, 3 (pack 2).
    lengths, offsets = [1, 5, 7, 0, 16, 3], [0, 2, 2, 6]
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else "cpu"
        # cp = 1: sum of l(l+1)/2 -> 1 + 15, 0, 28 + 0 + 136 + 6.
        assert run(lengths, offsets, 1, backend, dtype, device).tolist() == [[16], [0], [170]]
        # cp = 2, length 5: padded to 8, chunks of 2; rank 0 holds q in {0,1,6,7} -> 1+2 = 3,
        # rank 1 holds q in {2,3,4,5} -> 3+4+5 = 12; length 1 puts its single pair on rank 0.
        got = run(lengths, offsets, 2, backend, dtype, device).tolist()
        assert got[0] == [1 + 3, 12]
        assert got[1] == [0, 0]


def test_lengths_one_and_many_ranks_of_padding():
    # With cp = 8 a length-1 document is padded to 16: only rank 0 has a real token.
    lengths, offsets = [1] * 10, [0, 10]
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else "cpu"
        assert run(lengths, offsets, 8, backend, device=device).tolist() == [[10] + [0] * 7]


def test_totals_above_int32():
    # 200k tokens: 2.0e10 pairs in one document, above 2^31 on every rank up to cp = 4.
    lengths, offsets = [200_000, 65_537, 3, 99_999], [0, 2, 2, 4]
    for cp in (1, 4):
        expected = brute_force(lengths, offsets, cp)
        assert min(expected[0]) > 2**31
        for backend in ("triton", "torch"):
            device = DEVICE if backend == "triton" else "cpu"
            assert run(lengths, offsets, cp, backend, device=device).tolist() == expected
    assert (
        run(lengths, offsets, 1, "torch", device="cpu")[0, 0].item()
        == 200_000 * 200_001 // 2 + 65_537 * 65_538 // 2
    )


@pytest.mark.parametrize("cp", [1, 3, 8])
def test_longest_supported_documents(cp):
    # Near the int32 limit of the kernel's index math; expected from Python big ints.
    longest = 2**31 - 2 * cp
    lengths, offsets = [longest, longest - 1, 2**31 - 2 * cp - 7, 1], [0, 2, 4]
    expected = [[0] * cp for _ in range(2)]
    for p in range(2):
        for d in range(offsets[p], offsets[p + 1]):
            length = lengths[d]
            chunk = -(-length // (2 * cp))
            for r in range(cp):
                for a in (r * chunk, (2 * cp - 1 - r) * chunk):
                    hi, lo = min(a + chunk, length), min(a, length)
                    expected[p][r] += hi * (hi + 1) // 2 - lo * (lo + 1) // 2
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else "cpu"
        assert run(lengths, offsets, cp, backend, device=device).tolist() == expected
    assert sum(expected[0]) == sum(n * (n + 1) // 2 for n in lengths[:2])


def test_row_sum_is_cp_invariant():
    rng = random.Random(7)
    lengths, offsets = random_case(rng, num_packs=40, max_docs=5, max_len=3000)
    total = run(lengths, offsets, 1, "torch", device="cpu")[:, 0]
    assert total.tolist() == [
        sum(lengths[d] * (lengths[d] + 1) // 2 for d in range(offsets[p], offsets[p + 1])) for p in range(40)
    ]
    for cp in (2, 4, 8):
        for backend in ("triton", "torch"):
            device = DEVICE if backend == "triton" else "cpu"
            assert torch.equal(run(lengths, offsets, cp, backend, device=device).sum(1), total)


def test_empty_inputs_and_offset_window():
    for backend in ("triton", "torch"):
        device = DEVICE if backend == "triton" else "cpu"
        assert tuple(run([], [0], 4, backend, device=device).shape) == (0, 4)
        assert run([], [0, 0, 0], 2, backend, device=device).tolist() == [[0, 0], [0, 0]]
        # Offsets need not start at 0 nor cover every document.
        assert run([9, 2, 3, 9], [1, 2, 3], 1, backend, device=device).tolist() == [[3], [6]]


def test_reference_chunking_matches_unchunked():
    rng = random.Random(3)
    lengths, offsets = random_case(rng, num_packs=50, max_docs=7, max_len=500)
    lt, ot = torch.tensor(lengths), torch.tensor(offsets)
    assert torch.equal(attention_cost_reference(lt, ot, 4, chunk_docs=5), attention_cost_reference(lt, ot, 4))


@pytest.mark.parametrize("cp", [3, 8])
def test_triton_writes_every_output(cp):
    # Poisoned output buffer (the integer analogue of NaN): every entry must be overwritten.
    lengths, offsets = random_case(random.Random(5), num_packs=129, max_docs=3, max_len=40)
    out = torch.full((129, cp), -(2**62), dtype=torch.int64, device=DEVICE)
    lt = torch.tensor(lengths, device=DEVICE)
    ot = torch.tensor(offsets, device=DEVICE)
    _attention_cost_triton(lt, ot, cp, out=out)
    assert out.cpu().tolist() == brute_force(lengths, offsets, cp)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(doc_lengths=torch.tensor([1.0]), pack_offsets=torch.tensor([0, 1])), "int32 or int64"),
        (dict(doc_lengths=torch.tensor([[1]]), pack_offsets=torch.tensor([0, 1])), "1-D"),
        (dict(doc_lengths=torch.tensor([1]), pack_offsets=torch.tensor([], dtype=torch.int64)), "num_packs"),
        (dict(doc_lengths=torch.tensor([-1]), pack_offsets=torch.tensor([0, 1])), ">= 0"),
        (dict(doc_lengths=torch.tensor([1, 2]), pack_offsets=torch.tensor([0, 2, 1])), "non-decreasing"),
        (dict(doc_lengths=torch.tensor([1, 2]), pack_offsets=torch.tensor([0, 3])), "num_docs=2"),
        (dict(doc_lengths=torch.tensor([2**31 - 3]), pack_offsets=torch.tensor([0, 1])), "longest supported"),
    ],
)
def test_bad_input_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_cost(cp=2, **kwargs)


def test_bad_cp_and_backend():
    lt, ot = torch.tensor([3]), torch.tensor([0, 1])
    for cp in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="cp must be"):
            attention_cost(lt, ot, cp)
    with pytest.raises(ValueError, match="backend must be"):
        attention_cost(lt, ot, 1, backend="cuda")


def test_pairs_to_flops():
    # One pair, 32 heads of 128, 2 layers: forward 4*128*32*2 = 32768, with backward x3.
    assert (
        attention_pairs_to_flops(1, num_heads=32, head_dim=128, num_layers=2, include_backward=False) == 32768
    )
    assert attention_pairs_to_flops(10, num_heads=32, head_dim=128, num_layers=2) == 10 * 32768 * 3
    assert attention_pairs_to_flops(2, num_heads=1, head_dim=1, backward_factor=2.5) == 28  # 2 * 4 * 3.5
    big = torch.tensor([[2**40, 0]], dtype=torch.int64)
    got = attention_pairs_to_flops(big, num_heads=64, head_dim=128, num_layers=80)
    assert got.dtype == torch.float64 and got[0, 0].item() == float(2**40 * 4 * 128 * 64 * 80 * 3)
    with pytest.raises(ValueError, match="num_heads"):
        attention_pairs_to_flops(1, num_heads=0, head_dim=128)
    with pytest.raises(ValueError, match="integer tensor"):
        attention_pairs_to_flops(torch.tensor([1.0]), num_heads=1, head_dim=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_gpu_large_matches_reference(cp):
    gen = torch.Generator().manual_seed(cp)
    counts = torch.randint(0, 25, (100_000,), generator=gen)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    lengths = torch.randint(1, 20_000, (int(offsets[-1]),), generator=gen, dtype=torch.int64)
    expected = attention_cost_reference(lengths, offsets, cp)
    got = attention_cost(lengths.cuda().int(), offsets.cuda(), cp)
    assert torch.equal(got.cpu(), expected)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    from megatron_hbp.kernels.utils import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "f") == "torch"
    assert resolve_backend("torch", torch.device("cuda"), "f") == "torch"
    assert resolve_backend("auto", torch.device("cuda"), "f") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu, "f")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu, "f") == "triton"
