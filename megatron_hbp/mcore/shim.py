"""Run Megatron-Core 0.19.2 on a machine without CUDA (development, CI, the CPU demo).

Installed by :func:`install_cpu_shim` only when ``torch.cuda.is_available()`` is False; a
no-op on GPU machines. What it does (measured needs, ENVIRONMENT.md):

1. routes the CUDA RNG state functions Megatron's RNG tracker uses to the CPU generator,
2. stubs ``torch.cuda.current_device/synchronize/Stream/Event/current_stream/...``,
3. maps every ``device="cuda"`` / ``device=0`` / ``.cuda()`` / ``.to("cuda")`` to the CPU
   with a process-wide ``TorchFunctionMode``,
4. reports ``Tensor.type()`` of CPU float tensors as ``torch.cuda.*`` (the distributed
   optimizer and grad clipping assert on it).

It patches process globals on purpose and only in processes that cannot use CUDA anyway;
nothing here changes numerics.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(dev) -> bool:
    if dev is None:
        return False
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch function call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(...)
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if name in ("pin_memory",):
            return args[0]
        return func(*args, **kwargs)


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_orig_tensor_type = torch.Tensor.type
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _orig_tensor_type(self)
        return _CUDA_TYPE_NAMES.get(name, name)
    if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
        dtype = dtype.replace("torch.cuda.", "torch.")
    return _orig_tensor_type(self, dtype, non_blocking, **kwargs)


def install_cpu_shim() -> bool:
    """Install the shim if CUDA is absent. Idempotent. Returns True when installed."""
    global _INSTALLED, _MODE
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Event = _DummyEvent
    cuda.Stream = _DummyStream
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: leave that one alone.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    torch.Tensor.type = _tensor_type
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # process-wide: left active for the life of the process
    _INSTALLED = True
    return True


def shim_installed() -> bool:
    return _INSTALLED
