"""``MeasuredProfiler``: the cost model's ``Profiler`` interface, measured on the local GPU.

Runs real training iterations of the trainer's model on packs of random token ids and reports
the time of forward + backward over the packs (one micro-batch each) and the peak memory of the
GPU. The model is wrapped exactly as training wraps it (``megatron_hbp.mcore.build``: Megatron
DDP with its fp32 gradient buffer, Megatron Adam, bf16) and every iteration ends with an
optimizer step, so the peak includes what training holds besides activations: bf16 weights
(2 B/param), fp32 gradient buffer (4), fp32 main weights (4) and Adam moments (8), i.e.
18 B/param on one GPU. The micro-batches go through Megatron's ``forward_backward_func`` with
the trainer's ``forward_step``, as in a training step.

Lives in ``megatron_hbp.mcore`` (the only package that imports Megatron); the interface
(``Profiler``, ``ProfileResult``) is the cost model's, so ``calibrate`` / ``measure_points`` take
it like ``AnalyticProfiler``. One GPU, CP 1 only (CP > 1 needs a CP group of several GPUs).
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from megatron_hbp.costmodel.profiler import Profiler, ProfileResult
from megatron_hbp.model_config import ModelConfig, load_model_config


class MeasuredProfiler(Profiler):
    """Real training iterations (forward + backward + optimizer step) on the local GPU.

    Args:
        model: ``ModelConfig`` or preset name (``megatron_hbp.model_config``).
        iterations: timed iterations per ``profile`` call (after ``warmup``); the median is used.
        warmup: untimed iterations first (the first also allocates the Adam moments).
        memory_budget_bytes: defaults to the GPU's total memory.
        attention_backend: passed to ``megatron_hbp.mcore.model.build_model``.
        loss_impl: ``auto`` / ``fused`` / ``megatron``, resolved as training resolves it
            (``megatron_hbp.mcore.loss.resolve_loss_impl``: ``auto`` is the fused loss on CUDA), so
            the peak memory holds the logits only where training would.
        seed: model initialisation and token ids.
        device: ``"cuda"``; ``"cpu"`` only runs the same iterations as a smoke test of the path
            (fp32, host-clock times, ``peak_memory_bytes`` and the budget NaN).

    ``profile`` returns ``time_s``: median seconds of forward + backward over all packs
    (gradient reduction included, the optimizer step excluded); ``peak_memory_bytes``:
    ``torch.cuda.max_memory_allocated`` over the timed iterations and their optimizer steps.
    """

    def __init__(
        self,
        model: ModelConfig | str,
        *,
        iterations: int = 3,
        warmup: int = 1,
        memory_budget_bytes: float | None = None,
        attention_backend: str = "auto",
        loss_impl: str = "auto",
        seed: int = 0,
        device: str = "cuda",
    ):
        self.model_cfg = load_model_config(model) if isinstance(model, str) else model
        self.num_layers = self.model_cfg.num_layers
        self.iterations, self.warmup, self.seed = int(iterations), int(warmup), int(seed)
        if self.iterations < 1 or self.warmup < 0:
            raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}")
        self.attention_backend = attention_backend
        self.loss_impl = loss_impl
        self.device = device
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        self._budget = memory_budget_bytes
        self._model = None
        self._optimizer = None
        self._device = None

    @property
    def memory_budget_bytes(self) -> float:
        if self._budget is None and self.device == "cpu":
            return float("nan")
        if self._budget is None:
            self._require_cuda()
            self._budget = float(torch.cuda.get_device_properties(0).total_memory)
        return self._budget

    @staticmethod
    def _require_cuda() -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "MeasuredProfiler needs a CUDA GPU (it measures GPU time and memory); on CPU use "
                "megatron_hbp.costmodel.AnalyticProfiler"
            )

    def setup(self, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
        """Build the model, DDP and optimizer once (``profile`` calls it with the defaults).

        ``device="cpu"`` / ``torch.float32`` only serve the CPU smoke test of the training path.
        Returns ``(ddp_model, optimizer)``.
        """
        if self._model is not None:
            return self._model, self._optimizer
        from megatron_hbp.mcore.build import wrap_ddp_and_optimizer
        from megatron_hbp.mcore.config import OptimizerConfig
        from megatron_hbp.mcore.launch import init_distributed
        from megatron_hbp.mcore.model import build_model
        from megatron_hbp.mcore.parallel import ensure_model_parallel, seed_model_parallel_rng

        init_distributed()  # single process unless launched by torchrun
        ensure_model_parallel(1, 1, keep_other_sizes=True)
        seed_model_parallel_rng(self.seed)
        model = build_model(self.model_cfg, dtype=dtype, attention_backend=self.attention_backend)
        model = model.to(device)
        # lr/clip as a real run; their values do not change time or memory
        self._model, self._optimizer = wrap_ddp_and_optimizer(
            model, OptimizerConfig(lr=1e-5), bf16=dtype == torch.bfloat16, dtype=dtype
        )
        self._device = torch.device(device)
        return self._model, self._optimizer

    def make_inputs(self, packs: list[np.ndarray]) -> list[dict]:
        """Model inputs of ``packs`` (document lengths) with random token ids, on the setup device."""
        from megatron_hbp.mcore.batch import build_packed_batch, to_model_inputs

        rng = np.random.default_rng(self.seed)
        vocab = self.model_cfg.vocab_size
        out = []
        for p in packs:
            docs = [(rng.integers(1, vocab, int(n)), np.ones(int(n), np.uint8)) for n in p]
            out.append(to_model_inputs(build_packed_batch(docs, [int(n) for n in p]), self._device))
        return out

    def forward_backward(self, inputs: list[dict]) -> list[dict]:
        """One step's forward + backward over ``inputs`` (one micro-batch each), as training runs it."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_hbp.mcore.loss import forward_step, resolve_loss_impl

        impl = resolve_loss_impl(self.loss_impl, "step_token_mean")
        model, optimizer = self._model, self._optimizer
        model.zero_grad_buffer()
        optimizer.zero_grad()
        return get_forward_backward_func()(
            forward_step_func=functools.partial(forward_step, impl=impl),
            data_iterator=iter(inputs),
            model=[model],
            num_microbatches=len(inputs),
            seq_length=max(int(x["tokens"].shape[1]) for x in inputs),
            micro_batch_size=1,
            forward_only=False,
        )

    def profile(self, packs, pack_length, cp, recompute_layers):
        on_cuda = self.device == "cuda"
        if on_cuda:
            self._require_cuda()
        if cp != 1:
            raise NotImplementedError(
                "MeasuredProfiler runs on one GPU: cp > 1 needs a CP group of several GPUs "
                "(profile cp=1 settings and let calibrate() fit the model, or run under torchrun)"
            )
        if not packs:
            raise ValueError("profile needs at least one pack")
        from megatron_hbp.mcore.model import set_recompute

        model, optimizer = self.setup() if on_cuda else self.setup("cpu", torch.float32)
        set_recompute(model, int(recompute_layers))
        inputs = self.make_inputs(packs)
        times = []
        for it in range(self.warmup + self.iterations):
            if it == self.warmup and on_cuda:  # steady state: Adam moments exist from the warm-up step on
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.forward_backward(inputs)
                end.record()
                optimizer.step()  # outside the timed region, inside the peak-memory window
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                self.forward_backward(inputs)
                elapsed = time.perf_counter() - t0
                optimizer.step()
            if it >= self.warmup:
                times.append(elapsed)
        tokens = float(sum(int(np.sum(p)) for p in packs))
        return ProfileResult(
            pack_length=int(pack_length),
            cp=1,
            recompute_layers=int(recompute_layers),
            num_packs=len(packs),
            tokens_per_gpu=tokens,
            time_s=float(np.median(times)),
            peak_memory_bytes=float(torch.cuda.max_memory_allocated()) if on_cuda else float("nan"),
            memory_budget_bytes=self.memory_budget_bytes,
        )
