"""Argument checks of the public cross-entropy functions: one-line errors naming the argument
and the fix."""

from __future__ import annotations

import numbers

import torch

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _check_normalizer(normalizer, where: str, device) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(
                f"{where}: normalizer tensor must have one element, got shape {tuple(normalizer.shape)}"
            )
        if normalizer.device != device:
            raise ValueError(f"{where}: normalizer is on {normalizer.device}, inputs on {device}; move it")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real) or not normalizer > 0:
        raise ValueError(
            f"{where}: normalizer must be a positive number, a one-element tensor or None, got {normalizer!r}"
        )


def _check_labels(
    labels, T: int, where: str, device, v_global: int, ignore_index: int, check_values: bool
) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{where}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{where}: labels must be int64 (or int32), got {labels.dtype}; use labels.long()")
    if tuple(labels.shape) != (T,):
        raise ValueError(f"{where}: labels must have shape [T] = [{T}], got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{where}: labels are on {labels.device}, inputs on {device}; move them")
    if check_values and T:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v_global))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise ValueError(
                f"{where}: labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {v_global}) and is not "
                f"ignore_index={ignore_index}"
            )


def _check_float(t, name: str, where: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{where}: {name} dtype must be float32 or bfloat16, got {t.dtype}")


def _check_chunks(chunk_tokens, chunk_vocab, where: str) -> None:
    for name, value in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where}: {name} must be None or an int >= 1, got {value!r}")
