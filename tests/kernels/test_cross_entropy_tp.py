"""Vocab-parallel cross-entropy with 2 gloo processes on CPU against the single-process fp32
reference on the full vocabulary. One spawn runs every case (process start-up dominates)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks

WORLD = 2
T, H, V_LOCAL = 53, 40, 150  # V = 300: neither T nor V_local is a multiple of the block


def _case(seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen)
    weight = torch.randn(WORLD * V_LOCAL, H, generator=gen) * 0.3
    labels = torch.randint(0, WORLD * V_LOCAL, (T,), generator=gen)
    # Labels in both shards, on shard edges, and ignored tokens.
    labels[:4] = torch.tensor([0, V_LOCAL - 1, V_LOCAL, WORLD * V_LOCAL - 1])
    labels[5::6] = -100
    return hidden, weight, labels


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _worker(rank: int, world: int) -> None:
    # Import inside the child: it must see TRITON_INTERPRET inherited from the parent.
    from megatron_hbp.kernels import (
        token_balanced_cross_entropy,
        token_balanced_cross_entropy_from_logits,
        token_balanced_cross_entropy_reference,
    )

    dist.init_process_group("gloo", rank=rank, world_size=world)  # env:// from tests.distributed
    group = dist.group.WORLD
    try:
        shard = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
        # (dtype, tolerance, backends with every sub-check, backends with the core checks):
        # the interpreter is slow, and the TP logic around the kernels is shared Python.
        triton_core = [] if torch.cuda.is_available() else ["triton"]
        cases = [(torch.float32, 1e-5, ["torch"], triton_core), (torch.bfloat16, 1.6e-2, ["torch"], [])]
        for dtype, tol, full_backends, core_backends in cases:
            hidden, weight, labels = _case(seed=11)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            h_ref = hidden.float().clone().requires_grad_()
            w_ref = weight.float().clone().requires_grad_()
            ref = token_balanced_cross_entropy_reference(h_ref, w_ref, labels, normalizer=40.0)
            ref.backward()
            for backend in full_backends + core_backends:
                full = backend in full_backends
                h = hidden.clone().requires_grad_()
                w = weight[shard].clone().requires_grad_()
                loss, count = token_balanced_cross_entropy(
                    h, w, labels, torch.tensor(40.0), tp_group=group, backend=backend, return_num_tokens=True
                )
                loss.backward()
                where = f"rank {rank} {backend} {dtype}"
                loss_tol = 1e-5 if dtype == torch.float32 else 1e-4  # inputs are bf16-exact in fp32
                assert abs(loss.item() - ref.item()) <= loss_tol * abs(ref.item()), where
                assert count.item() == int((labels != -100).sum()), where
                assert _rel(h.grad, h_ref.grad) <= tol, where
                assert _rel(w.grad, w_ref.grad[shard]) <= tol, where

                # Gradients computed in the forward: same values.
                h1 = hidden.clone().requires_grad_()
                w1 = weight[shard].clone().requires_grad_()
                loss1 = token_balanced_cross_entropy(
                    h1,
                    w1,
                    labels,
                    40.0,
                    tp_group=group,
                    backend=backend,
                    grad_mode="in_forward",
                    chunk_tokens=20,
                )
                loss1.backward()
                assert abs(loss1.item() - ref.item()) <= loss_tol * abs(ref.item()), where
                assert _rel(h1.grad, h_ref.grad) <= tol, where
                assert _rel(w1.grad, w_ref.grad[shard]) <= tol, where

                if full:
                    # Without the hidden-grad all-reduce each rank holds its shard's share.
                    h2 = hidden.clone().requires_grad_()
                    token_balanced_cross_entropy(
                        h2,
                        weight[shard],
                        labels,
                        40.0,
                        tp_group=group,
                        backend=backend,
                        all_reduce_hidden_grad=False,
                    ).backward()
                    part = h2.grad.float()
                    assert _rel(part, h_ref.grad) > 1e-2, where  # a share, not the whole
                    dist.all_reduce(part, group=group)
                    assert _rel(part, h_ref.grad) <= tol, where

                # Logits version: shard of the full fp32 logits.
                logits = (hidden.float() @ weight.float().T).to(dtype)
                x_ref = logits.float().clone().requires_grad_()
                ref_x = torch.nn.functional.cross_entropy(x_ref, labels, reduction="sum") / 40.0
                ref_x.backward()
                x = logits[:, shard].clone().requires_grad_()
                loss_x = token_balanced_cross_entropy_from_logits(
                    x, labels, 40.0, tp_group=group, backend=backend
                )
                loss_x.backward()
                assert abs(loss_x.item() - ref_x.item()) <= loss_tol * abs(ref_x.item()), where
                assert _rel(x.grad, x_ref.grad[:, shard]) <= tol, where

                if not full:
                    continue
                # All tokens ignored: 0 and zero grads on every rank.
                ignored = torch.full_like(labels, -100)
                h3 = hidden.clone().requires_grad_()
                w3 = weight[shard].clone().requires_grad_()
                loss3 = token_balanced_cross_entropy(h3, w3, ignored, tp_group=group, backend=backend)
                loss3.backward()
                assert loss3.item() == 0.0, where
                assert torch.count_nonzero(h3.grad) == 0 and torch.count_nonzero(w3.grad) == 0, where
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_two_gloo_processes():
    assert "TRITON_INTERPRET" in os.environ or torch.cuda.is_available()  # the ranks inherit it
    run_ranks(WORLD, _worker, timeout=900)


def test_tp_labels_are_checked_against_the_global_vocabulary():
    # Without a group: V = V_local, so the label V_local is out of range (CPU validation).
    from megatron_hbp.kernels import token_balanced_cross_entropy

    hidden, weight, labels = _case(seed=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_balanced_cross_entropy(hidden, weight[:V_LOCAL], labels)
