"""Tests of the token-balanced cross-entropy (fused linear and from-logits) against the plain
fp32 PyTorch reference (``F.cross_entropy`` on materialised fp32 logits, autograd grads).

The Triton path runs compiled on CUDA and in the interpreter on CPU (root conftest sets
TRITON_INTERPRET=1), at tiny shapes chosen to cross block edges: T = 70 (blocks of 32),
V = 300 (blocks of 64), H = 48 (blocks of 32). Every buffer a kernel must fill starts as NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_hbp.kernels import (
    count_loss_tokens,
    token_balanced_cross_entropy,
    token_balanced_cross_entropy_from_logits,
    token_balanced_cross_entropy_from_logits_reference,
    token_balanced_cross_entropy_reference,
)
from megatron_hbp.kernels import utils as kernel_utils
from megatron_hbp.kernels.cross_entropy import common as ce_common
from megatron_hbp.kernels.cross_entropy import fused_linear as ce_module

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# One table of tolerances, by input dtype. Loss: (rtol, atol) on the fp32 scalar. Grad:
# max |got - ref| / max |ref| (bf16 gradients are rounded once to bf16, whose ulp is 2^-8,
# and the interpreter truncates instead of rounding: a few ulps of headroom).
TOL = {
    torch.float32: {"loss": (1e-5, 1e-5), "grad": 1e-5},
    torch.bfloat16: {"loss": (1e-5, 1e-4), "grad": 1.6e-2},
}
# Besides the table, bf16 gradients must be within 2x of torch eager's own bf16 error
# (flash-attention's rule), plus one bf16 ulp of slack for truncating casts.
BF16_ULP = 2.0**-8


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "POISON_OUTPUTS", True)


def make_case(T=70, H=48, V=300, dtype=torch.float32, seed=0, ignore_every=5, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(dtype)
    labels = torch.randint(0, V, (T,), generator=gen)
    if T:
        labels[0], labels[-1] = 0, V - 1  # first and last vocabulary entries
        if ignore_every:
            labels[1::ignore_every] = -100
    return hidden.to(device), weight.to(device), labels.to(device)


def reference(hidden, weight, labels, normalizer=None, ignore_index=-100):
    h = hidden.detach().cpu().float().requires_grad_()
    w = weight.detach().cpu().float().requires_grad_()
    norm = normalizer.cpu() if isinstance(normalizer, torch.Tensor) else normalizer
    loss = token_balanced_cross_entropy_reference(h, w, labels.cpu(), norm, ignore_index)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def ours(hidden, weight, labels, scale=1.0, **kwargs):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = token_balanced_cross_entropy(h, w, labels, **kwargs)
    (loss * scale).backward()
    return loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()


def grad_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close_loss(got, ref, dtype):
    rtol, atol = TOL[dtype]["loss"]
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)


def backend_device(backend):
    return DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunks", [(None, None), (32, 100)], ids=["default", "chunked"])
def test_linear_matches_reference(dtype, backend, chunks):
    hidden, weight, labels = make_case(dtype=dtype, device=backend_device(backend))
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, normalizer=17.0)
    loss, dh, dw = ours(
        hidden,
        weight,
        labels,
        normalizer=17.0,
        backend=backend,
        grad_mode="recompute",
        chunk_tokens=chunks[0],
        chunk_vocab=chunks[1],
    )
    assert_close_loss(loss, ref_loss, dtype)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert grad_error(dh, ref_dh) <= TOL[dtype]["grad"]
    assert grad_error(dw, ref_dw) <= TOL[dtype]["grad"]
    if dtype == torch.bfloat16:
        # Torch eager in bf16 (materialised bf16 logits) against the same fp32 reference.
        h = hidden.detach().cpu().clone().requires_grad_()
        w = weight.detach().cpu().clone().requires_grad_()
        (F.cross_entropy(h @ w.T, labels.cpu(), reduction="sum") / 17.0).backward()
        assert grad_error(dh, ref_dh) <= 2 * grad_error(h.grad, ref_dh) + BF16_ULP
        assert grad_error(dw, ref_dw) <= 2 * grad_error(w.grad, ref_dw) + BF16_ULP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk_tokens", [None, 32])
def test_in_forward_grad_mode_matches_reference(dtype, backend, chunk_tokens):
    hidden, weight, labels = make_case(dtype=dtype, device=backend_device(backend))
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, normalizer=17.0)
    # Seed 2.0: the stored gradients are scaled by the incoming gradient in backward.
    loss, dh, dw = ours(
        hidden,
        weight,
        labels,
        scale=2.0,
        normalizer=17.0,
        backend=backend,
        grad_mode="in_forward",
        chunk_tokens=chunk_tokens,
    )
    assert_close_loss(loss, ref_loss, dtype)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert grad_error(dh, 2 * ref_dh) <= TOL[dtype]["grad"]
    assert grad_error(dw, 2 * ref_dw) <= TOL[dtype]["grad"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_in_forward_grad_mode_edges(backend):
    hidden, weight, labels = make_case(T=21, V=90, device=backend_device(backend))
    ref_loss, _, ref_dw = reference(hidden, weight, labels)
    w = weight.clone().requires_grad_()
    loss = token_balanced_cross_entropy(hidden, w, labels, backend=backend, grad_mode="in_forward")
    loss.backward(retain_graph=True)
    assert grad_error(w.grad.cpu(), ref_dw) <= 1e-5
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    with torch.no_grad():
        loss = token_balanced_cross_entropy(hidden, w, labels, backend=backend, grad_mode="in_forward")
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = token_balanced_cross_entropy(
        h, w, torch.full_like(labels, -100), backend=backend, grad_mode="in_forward"
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk_vocab", [None, 100])
def test_from_logits_matches_reference(dtype, backend, chunk_vocab):
    hidden, weight, labels = make_case(dtype=dtype, T=40, V=400)
    logits = (hidden.float() @ weight.float().T * 2.0).to(dtype).to(backend_device(backend))
    x_ref = logits.detach().cpu().float().requires_grad_()
    ref = token_balanced_cross_entropy_from_logits_reference(x_ref, labels, normalizer=torch.tensor(9.0))
    ref.backward()
    x = logits.detach().clone().requires_grad_()
    loss = token_balanced_cross_entropy_from_logits(
        x, labels.to(x.device), torch.tensor(9.0, device=x.device), backend=backend, chunk_vocab=chunk_vocab
    )
    loss.backward()
    assert_close_loss(loss.detach().cpu(), ref.detach(), dtype)
    assert x.grad.dtype == dtype
    assert grad_error(x.grad.cpu(), x_ref.grad) <= TOL[dtype]["grad"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_normalizer_forms_and_grad_scale(backend):
    hidden, weight, labels = make_case(T=33, V=130, device=backend_device(backend))
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels)
    plain, dh, dw = ours(hidden, weight, labels, backend=backend)
    torch.testing.assert_close(plain, ref_loss, rtol=1e-5, atol=1e-5)
    for norm in (4, 4.0, torch.tensor(4.0, device=hidden.device), torch.tensor([4], device=hidden.device)):
        # The backward seed 3.0 checks that the incoming gradient is applied too.
        loss, dh4, dw4 = ours(hidden, weight, labels, scale=3.0, normalizer=norm, backend=backend)
        torch.testing.assert_close(loss, ref_loss / 4, rtol=1e-5, atol=1e-5)
        assert grad_error(dh4, ref_dh * 0.75) <= 1e-5
        assert grad_error(dw4, ref_dw * 0.75) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_tokens_ignored(dtype, backend):
    hidden, weight, labels = make_case(T=37, V=130, dtype=dtype, device=backend_device(backend))
    labels = torch.full_like(labels, -100)
    for norm in (None, torch.tensor(3.0, device=hidden.device)):
        loss, dh, dw = ours(hidden, weight, labels, normalizer=norm, backend=backend)
        assert loss.item() == 0.0
        assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0
    logits = torch.randn(37, 130, dtype=dtype, device=hidden.device).requires_grad_()
    loss = token_balanced_cross_entropy_from_logits(logits, labels, 5.0, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_ignore_index_and_count(backend):
    hidden, weight, labels = make_case(T=45, V=200, ignore_every=0, device=backend_device(backend))
    labels[3:9] = -1
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, ignore_index=-1)
    h = hidden.detach().clone().requires_grad_()
    loss, count = token_balanced_cross_entropy(
        h, weight, labels, ignore_index=-1, backend=backend, return_num_tokens=True
    )
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, rtol=1e-5, atol=1e-5)
    assert grad_error(h.grad.cpu(), ref_dh) <= 1e-5
    assert count.dtype == torch.int64 and count.item() == 45 - 6
    assert count_loss_tokens(labels, ignore_index=-1).item() == 39
    assert count_loss_tokens(torch.tensor([-100, 3, -100, 0])).item() == 2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inputs_are_not_modified_and_weight_only_grad(backend):
    hidden, weight, labels = make_case(T=20, V=70, device=backend_device(backend))
    copies = [t.clone() for t in (hidden, weight, labels)]
    w = weight.clone().requires_grad_()
    token_balanced_cross_entropy(hidden, w, labels, backend=backend).backward()
    for before, after in zip(copies, (hidden, weight, labels)):
        assert torch.equal(before, after)
    _, _, ref_dw = reference(hidden, weight, labels)
    assert grad_error(w.grad.cpu(), ref_dw) <= 1e-5
    logits = torch.randn(20, 70, device=hidden.device)
    before = logits.clone()
    x = logits.requires_grad_()
    token_balanced_cross_entropy_from_logits(x, labels, backend=backend).backward()
    assert torch.equal(x.detach(), before)


def test_empty_batch():
    hidden, weight, labels = make_case(T=0, V=50)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    loss, count = token_balanced_cross_entropy(h, w, labels, return_num_tokens=True)
    loss.backward()
    assert loss.item() == 0.0 and count.item() == 0
    assert h.grad.shape == (0, 48) and torch.count_nonzero(w.grad) == 0


def test_chunk_sizes_bound_memory():
    # One chunk of logits never exceeds the element budget, whatever T and V are.
    cpu = torch.device("cpu")
    for T, V in [(131072, 128256), (8192, 151936), (70, 300), (1, 10**6)]:
        Tc, Vc = ce_common._chunk_sizes(T, V, cpu, None, None)
        assert 1 <= Tc <= T and 1 <= Vc <= V and Tc * Vc <= 1 << 22
    assert ce_common._chunk_sizes(70, 300, cpu, 32, 100) == (32, 100)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h, w, y: (h.double(), w, y), "float32 or bfloat16"),
        (lambda h, w, y: (h, w.bfloat16(), y), "must match hidden"),
        (lambda h, w, y: (h, w[:, :-1], y), "H must match"),
        (lambda h, w, y: (h[0], w, y), "2-D"),
        (lambda h, w, y: (h, w, y.float()), "int64"),
        (lambda h, w, y: (h, w, y[:-1]), r"shape \[T\]"),
        (lambda h, w, y: (h, w, torch.where(y == 0, 70, y)), "outside the vocabulary"),
        (lambda h, w, y: (h, w, torch.where(y == 0, -5, y)), "outside the vocabulary"),
    ],
)
def test_bad_inputs(mutate, match):
    hidden, weight, labels = make_case(T=10, V=70)
    with pytest.raises(ValueError, match=match):
        token_balanced_cross_entropy(*mutate(hidden, weight, labels))


def test_bad_options():
    hidden, weight, labels = make_case(T=10, V=70)
    for norm in (0, -1.0, "4", True):
        with pytest.raises(ValueError, match="normalizer"):
            token_balanced_cross_entropy(hidden, weight, labels, normalizer=norm)
    with pytest.raises(ValueError, match="one element"):
        token_balanced_cross_entropy(hidden, weight, labels, normalizer=torch.ones(2))
    with pytest.raises(ValueError, match="chunk_vocab"):
        token_balanced_cross_entropy(hidden, weight, labels, chunk_vocab=0)
    with pytest.raises(ValueError, match="backend must be"):
        token_balanced_cross_entropy(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="grad_mode must be 'auto'"):
        token_balanced_cross_entropy(hidden, weight, labels, grad_mode="fused")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        token_balanced_cross_entropy_from_logits(torch.zeros(3, 4, dtype=torch.float16), labels[:3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_balanced_cross_entropy_from_logits(torch.zeros(3, 4), torch.tensor([0, 4, -100]))


# ----------------------------------------------------------------------------- default grad_mode


def test_default_grad_mode_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    resolve = ce_module._resolve_grad_mode
    assert resolve("auto", cuda, True) == "in_forward"
    assert resolve("auto", cuda, False) == "recompute"  # forward only: no logits chunk, lse only
    assert resolve("auto", cpu, True) == "recompute"
    assert resolve("auto", cpu, False) == "recompute"
    for mode in ("recompute", "in_forward"):
        assert resolve(mode, cuda, True) == resolve(mode, cpu, False) == mode


def test_default_grad_mode_sees_whether_a_gradient_is_needed(monkeypatch):
    seen = []
    real = ce_module._resolve_grad_mode

    def spy(mode, device, need_grad):
        seen.append((mode, device.type, need_grad))
        return real(mode, device, need_grad)

    monkeypatch.setattr(ce_module, "_resolve_grad_mode", spy)
    hidden, weight, labels = make_case(T=12, V=40)
    token_balanced_cross_entropy(hidden.requires_grad_(), weight, labels)
    token_balanced_cross_entropy(hidden.detach(), weight.requires_grad_(), labels)
    with torch.no_grad():
        token_balanced_cross_entropy(hidden, weight, labels)
    token_balanced_cross_entropy(hidden.detach(), weight.detach(), labels)
    token_balanced_cross_entropy(hidden, weight, labels, grad_mode="recompute")
    assert seen == [
        ("auto", "cpu", True),
        ("auto", "cpu", True),
        ("auto", "cpu", False),
        ("auto", "cpu", False),
        ("recompute", "cpu", True),
    ]


def test_default_on_cpu_is_recompute():
    # "recompute" allows several backwards through one forward; "in_forward" would raise.
    hidden, weight, labels = make_case(T=21, V=90)
    _, ref_dh, ref_dw = reference(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = token_balanced_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    loss.backward()
    assert grad_error(h.grad, 2 * ref_dh) <= 1e-5 and grad_error(w.grad, 2 * ref_dw) <= 1e-5


@pytest.fixture
def default_as_on_cuda(monkeypatch):
    """Resolve grad_mode="auto" as for CUDA tensors, so CPU tests run the CUDA default path."""
    real = ce_module._resolve_grad_mode
    monkeypatch.setattr(
        ce_module, "_resolve_grad_mode", lambda mode, device, need: real(mode, torch.device("cuda"), need)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("normalizer", [None, "tensor"])
def test_cuda_default_path_matches_reference(default_as_on_cuda, dtype, backend, normalizer):
    hidden, weight, labels = make_case(dtype=dtype, device=backend_device(backend))
    norm = None if normalizer is None else torch.tensor(17.0, device=hidden.device)
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, normalizer=norm)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = token_balanced_cross_entropy(h, w, labels, norm, chunk_tokens=32)  # 3 token chunks
    (loss * 2.0).backward(retain_graph=True)
    assert_close_loss(loss.detach().cpu(), ref_loss, dtype)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert grad_error(h.grad.cpu(), 2 * ref_dh) <= TOL[dtype]["grad"]
    assert grad_error(w.grad.cpu(), 2 * ref_dw) <= TOL[dtype]["grad"]
    with pytest.raises(RuntimeError, match="one backward per forward"):  # it ran "in_forward"
        loss.backward()


class _ThreadGroup:
    """A tensor-parallel group of ``size`` threads in this process: ``torch.distributed``'s
    get_rank / get_world_size / all_reduce, enough for the kernel's TP code."""

    def __init__(self, size: int):
        import threading

        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots = [None] * size
        self.local = threading.local()

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        assert group is self and not async_op
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        stacked = torch.stack([t.clone() for t in self.slots])
        out = stacked.amax(0) if op == torch.distributed.ReduceOp.MAX else stacked.sum(0)
        self.barrier.wait()  # every rank has read every input before anyone writes
        tensor.copy_(out)

    def run(self, fn):
        import threading

        results, errors = [None] * self.size, []

        def body(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("as_on_cuda", [False, True], ids=["cpu_default", "cuda_default"])
def test_default_path_vocab_parallel_like_the_trainer(monkeypatch, as_on_cuda):
    """The trainer's call: ``token_balanced_cross_entropy(hidden, weight_shard, targets, None,
    tp_group=tp)``, 2 ranks (threads), default grad_mode, against the full-vocabulary reference."""
    if as_on_cuda:
        real = ce_module._resolve_grad_mode
        monkeypatch.setattr(
            ce_module, "_resolve_grad_mode", lambda mode, device, need: real(mode, torch.device("cuda"), need)
        )
    world, v_local = 2, 75
    group = _ThreadGroup(world)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: group.local.rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: world)
    monkeypatch.setattr(torch.distributed, "all_reduce", group.all_reduce)
    hidden, weight, labels = make_case(T=45, V=world * v_local)
    labels[2:6] = torch.tensor([v_local - 1, v_local, 0, world * v_local - 1])  # shard edges
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels)

    def rank_step(rank):
        h = hidden.clone().requires_grad_()
        w = weight[rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
        loss = token_balanced_cross_entropy(
            h, w, labels, None, tp_group=group, backend="torch", chunk_tokens=16
        )
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for rank, (loss, dh, dw) in enumerate(group.run(rank_step)):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        assert grad_error(dh, ref_dh) <= 1e-5  # all-reduced over the group: the whole gradient
        assert grad_error(dw, ref_dw[rank * v_local : (rank + 1) * v_local]) <= 1e-5


@pytest.mark.parametrize("grad_mode", ["recompute", "in_forward"])
def test_not_twice_differentiable(grad_mode):
    hidden, weight, labels = make_case(T=12, V=40)
    _, ref_dh, _ = reference(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = token_balanced_cross_entropy(h, w, labels, grad_mode=grad_mode)
    dh, _ = torch.autograd.grad(loss, (h, w), create_graph=True)
    assert grad_error(dh.detach(), ref_dh) <= 1e-5  # first order is right
    with pytest.raises(RuntimeError, match="differentiate twice|does not require grad"):
        dh.sum().backward()


def test_in_forward_chunk_tokens():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    chunk = ce_module._in_forward_chunk_tokens
    # CUDA: 512 tokens, whatever V (up to 2^27 / 512 = 262144 columns), never more than T.
    assert chunk(8192, 128256, cuda, None) == 512
    assert chunk(32768, 151936, cuda, None) == 512
    assert chunk(8192, 262144, cuda, None) == 512
    assert chunk(300, 128256, cuda, None) == 300
    # Larger vocabulary shards: at most 2^27 logits, a multiple of 128 when >= 128.
    assert chunk(8192, 300000, cuda, None) == 384  # 447 -> 384
    assert chunk(8192, 1 << 20, cuda, None) == 128
    assert chunk(8192, 3 << 20, cuda, None) == 42
    assert chunk(8192, 128256, cuda, 1000) == 1000  # explicit chunk_tokens wins
    # CPU: 2^22 logits.
    assert chunk(8192, 128256, cpu, None) == 32
    assert chunk(70, 300, cpu, None) == 70
    # The memory rule at 8192x4096x128256 bf16: dweight + dhidden + one chunk against torch
    # eager's measured +12.61 GB (H100, 2026-11-26) stays under 10 %.
    T, H, V = 8192, 4096, 128256
    extra = 2 * V * H + 2 * T * H + 2 * chunk(T, V, cuda, None) * V
    assert extra == pytest.approx(1.2491e9, rel=1e-4) and extra / 12.61e9 < 0.0991


# ----------------------------------------------------------------------------- GPU (compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000, 256, 5000), (4099, 512, 32003)])
@pytest.mark.parametrize("grad_mode", ["auto", "recompute"])  # auto: "in_forward" on CUDA
def test_gpu_linear_larger_shapes(dtype, shape, grad_mode):
    T, H, V = shape
    hidden, weight, labels = make_case(T=T, H=H, V=V, dtype=dtype, ignore_every=7, device="cuda")
    ref_loss, ref_dh, ref_dw = reference(hidden, weight, labels, normalizer=float(T))
    loss, dh, dw = ours(
        hidden, weight, labels, normalizer=torch.tensor(float(T), device="cuda"), grad_mode=grad_mode
    )
    # fp32 tl.dot runs with input_precision="ieee"; long reductions over H and V loosen rtol.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    tol = TOL[dtype]["grad"] if dtype == torch.bfloat16 else 1e-4
    if dtype == torch.bfloat16 and grad_mode == "auto":
        # "in_forward" rounds the logits to bf16 as torch eager does (|z| ~ 7 here: ~1.7 % of
        # max |dweight|, measured on CPU in emulation), and adds one bf16 rounding of dweight
        # per 512-token chunk: the file's bf16 rule, within 2x torch eager's error.
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        (F.cross_entropy((h @ w.T).float(), labels, reduction="sum") / float(T)).backward()
        for got, eager, ref in ((dh, h.grad, ref_dh), (dw, w.grad, ref_dw)):
            assert grad_error(got, ref) <= 2 * grad_error(eager.cpu(), ref) + BF16_ULP
        return
    assert grad_error(dh, ref_dh) <= tol
    assert grad_error(dw, ref_dw) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_from_logits_larger(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3001, 50257, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 50257, (3001,), generator=gen)
    labels[::9] = -100
    # separate leaves: for fp32 ``logits.float()`` is ``logits`` itself, so the reference leaf
    # must not be the tensor the CUDA copy is made from (the copy would not be a leaf)
    x_ref = logits.detach().float().clone().requires_grad_()
    ref = token_balanced_cross_entropy_from_logits_reference(x_ref, labels, 100.0)
    ref.backward()
    x = logits.detach().cuda().requires_grad_()
    loss = token_balanced_cross_entropy_from_logits(x, labels.cuda(), 100.0)
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
    assert grad_error(x.grad.cpu(), x_ref.grad) <= TOL[dtype]["grad"]
