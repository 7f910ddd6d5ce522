"""Pieces shared by the fused-linear and from-logits paths: vocabulary-parallel bookkeeping,
chunk sizes, the reduction of the softmax state over the tensor-parallel group, the loss and
gradient scale, and :func:`count_loss_tokens`."""

from __future__ import annotations

import torch


def _vocab_start(group, v_local: int) -> int:
    if group is None:
        return 0
    return torch.distributed.get_rank(group) * v_local


def _tp_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group)


def _contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _chunk_sizes(
    T: int, V: int, device, chunk_tokens: int | None, chunk_vocab: int | None
) -> tuple[int, int]:
    """(Tc, Vc) of the backward (and the PyTorch path): Tc·Vc ≤ a fixed element budget."""
    # 2^25 logits = 64 MB of bf16 dz on CUDA: large enough for efficient GEMMs, small
    # against the 1 GB of the weight gradient itself at V = 128K, H = 4K.
    budget = (1 << 25) if device.type == "cuda" else (1 << 22)
    if chunk_vocab is None:
        chunk_vocab = V if budget >= T * V else max(512, (budget // max(T, 1)) // 128 * 128)
    if chunk_tokens is None:
        chunk_tokens = max(1, budget // chunk_vocab)
    return max(1, min(chunk_tokens, T)), max(1, min(chunk_vocab, V))


_MM_OUT_DTYPE_OK: bool | None = None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result, without fp32 copies of bf16 inputs on CUDA."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        if _MM_OUT_DTYPE_OK is not False:
            try:
                out = torch.mm(a, b, out_dtype=torch.float32)
                _MM_OUT_DTYPE_OK = True
                return out
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE_OK = False
        # Older torch: cuBLAS still accumulates in fp32, only the chunk result is rounded.
        return (a @ b).float()
    return a.float() @ b.float()


def _global_lse_and_target(m, s, tgt, group):
    """Reduce the per-rank states over the tensor-parallel group -> (lse [T], target [T])."""
    if group is not None and torch.distributed.get_world_size(group) > 1:
        dist = torch.distributed
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
        s = s * torch.exp(m - shift)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        tgt = tgt.clone()
        dist.all_reduce(tgt, op=dist.ReduceOp.SUM, group=group)
        m = m_all
    return m + torch.log(s), tgt


def _finish_loss(lse, tgt, labels, ignore_index, normalizer):
    is_loss_token = labels != ignore_index
    loss = torch.where(is_loss_token, lse - tgt, torch.zeros_like(lse)).sum()
    if normalizer is not None:
        loss = loss / normalizer
    return loss


def _grad_scale(grad_out: torch.Tensor, normalizer) -> torch.Tensor:
    """0-dim fp32 g/N on the device (no host sync)."""
    g = grad_out.detach().to(torch.float32).reshape(())
    if normalizer is not None:
        g = g / normalizer
    return g.contiguous()


def _normalizer_for(normalizer, device):
    if normalizer is None or not isinstance(normalizer, torch.Tensor):
        return None if normalizer is None else float(normalizer)
    return normalizer.detach().to(device=device, dtype=torch.float32).reshape(())


def count_loss_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Number of loss tokens (``labels != ignore_index``) as a 0-dim int64 tensor on the
    labels' device (no host sync). Sum it over micro-batches and data-parallel replicas to
    get the step's normalizer."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"count_loss_tokens: labels must be a torch.Tensor, got {type(labels).__name__}")
    return (labels != ignore_index).sum(dtype=torch.int64)
