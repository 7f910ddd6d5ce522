"""Training run configuration: one YAML file per run (``configs/*.yaml``), frozen dataclasses.

Top-level keys map onto :class:`TrainConfig`; unknown keys are errors (``configio``).
Relative paths are relative to the current working directory (run from the repo root).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from megatron_hbp.configio import ConfigError, check_overrides, from_dict, load_yaml
from megatron_hbp.mcore.batch import LOSS_NORMALIZATIONS

CP_BACKENDS = ("auto", "ulysses", "allgather", "te")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the samples and their pre-computed lengths live."""

    sample_info: str
    """Sample info file (``.npz`` from ``tools/preprocess_lengths.py``); built when missing and
    ``build_if_missing`` is true."""
    paths: list[str] = field(default_factory=list)
    """JSONL files / folders / globs to build the sample info from (only used to build it)."""
    demo: bool = False
    """Use the embedded demo data (``megatron_hbp.data.demo.ensure_demo_data``) as ``paths``."""
    tokenizer: str | None = None
    """Tokenizer (``.model`` / ``tokenizer.json``) for building; None = the one shipped in
    ``init_from`` (``tokenizer.json`` / ``tokenizer.model``) when set, else the default (mistral v1)."""
    template: str | None = None
    """Chat template for building the sample info (``llama3``, ``chatml``, ``mistral``, ``plain``);
    None = the built-in template matching the chat template shipped in ``init_from``, else ``llama3``."""
    max_length: int | None = None
    """Longest sample kept when building (None: no limit)."""
    build_if_missing: bool = False
    """Build the sample info (and nothing else) when the file does not exist."""
    num_workers: int = 2
    """Background worker processes that read and tokenise samples (0: in the training process)."""
    prefetch_factor: int = 4
    """Micro-batches each worker prepares ahead."""

    def __post_init__(self):
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass(frozen=True, kw_only=True)
class PlanSource:
    """The HBP plan: an existing plan file, or a plan config to build it from."""

    path: str
    """Plan file (``tools/plan.py --output``); built from ``config`` when missing."""
    config: str | None = None
    """Plan config YAML (``configs/plan_*.yaml``) used to build ``path`` when it is missing."""
    world_size: int | None = None
    """Override the plan config's world_size when building (None: keep it)."""
    overrides: dict = field(default_factory=dict)
    """Top-level plan-config keys replaced when building (e.g. ``tokens_per_step``, ``groups``)."""


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup steps (from 0 to lr)."""
    decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant' after warmup (Megatron's OptimizerParamScheduler)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0: off)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over the data x context ranks (Megatron's distributed optimizer)."""

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"optimizer: need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optimizer.decay_style '{self.decay_style}': use cosine, linear or constant")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoint saving (atomic step folders: Megatron torch_dist model / optimizer state plus
    weights-only per-rank scheduler and RNG files, with a checksum manifest; see docs/training.md)."""

    dir: str | None = None
    """Folder for checkpoints (``step_<N>/``); None: never save."""
    save_interval: int = 0
    """Save every N steps (0: only at the end)."""
    save_at_end: bool = True
    """Save after the last step."""
    load: str | None = None
    """Checkpoint to resume from: a ``step_<N>`` folder (used as given), or a checkpoint ``dir``
    (its newest complete and intact step folder; unfinished or corrupt ones are skipped with a
    warning)."""
    keep_last: int = 0
    """Keep only the newest K step folders in ``dir`` (older ones deleted after each save); 0: keep all."""
    format: str = "torch_dist"
    """``torch_dist``: model and optimizer through Megatron's dist_checkpointing (loads at another TP
    size / fewer data-parallel ranks, with either optimizer); ``per_rank``: the earlier one-file-per-rank
    format (a fallback). ``--load`` reads both."""
    async_save: bool = False
    """Write the torch_dist files in a background process while training goes on; the step folder is
    committed (manifest, rename, ``latest``) once every rank's write finished. Needs ``format: torch_dist``."""

    def __post_init__(self):
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last must be >= 0 (0 keeps all), got {self.keep_last}")
        if self.format not in ("torch_dist", "per_rank"):
            raise ConfigError(f"checkpoint.format must be torch_dist or per_rank, got {self.format!r}")
        if self.async_save and self.format != "torch_dist":
            raise ConfigError(
                "checkpoint.async_save needs checkpoint.format: torch_dist (per_rank saves are synchronous)"
            )


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Model-parallel sizes; the rest of the world is data x context parallel (from the plan)."""

    tp: int = 1
    """Tensor parallel size."""
    pp: int = 1
    """Pipeline parallel size (only 1: PP is not supported with HBP plans yet)."""

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"parallel: tp and pp must be >= 1 (tp={self.tp}, pp={self.pp})")
        if self.pp > 1:  # runs, but never checked against pp = 1; checkpoints and init_from refuse it
            raise ConfigError(
                f"parallel.pp={self.pp}: PP is not supported with HBP plans yet; use pp: 1 (scale with "
                "tp and the plan's data x context ranks)"
            )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run."""

    model: str | None = None
    """Model preset name (``tiny``, ``llama3_1_8b``, ...), a YAML file with ModelConfig keys, or a
    Hugging Face model folder / ``config.json`` (shapes read from it). None = ``init_from``."""
    init_from: str | None = None
    """Initial weights: a Hugging Face model folder (LLaMA / Qwen2 ``config.json`` + safetensors,
    converted on the fly by every rank) or a folder from ``tools/convert_checkpoint.py
    hf-to-megatron`` (the cached conversion; its ``--tp`` must equal ``parallel.tp``). Loaded
    after the model is built; ignored when resuming (``checkpoint.load`` wins). None: random init."""
    data: DataConfig
    """Samples and their sample info."""
    plan: PlanSource
    """The HBP plan (or the config to build it)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP sizes."""
    loss_normalization: str = "step_token_mean"
    """'step_token_mean' (stable loss, HBP), 'micro_batch_mean' or 'sample_mean' (paper Table 10)."""
    max_steps: int | None = None
    """Stop after this many plan steps (None: the whole plan)."""
    seed: int = 1234
    """Seed of the weight init and RNG."""
    dtype: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'."""
    attention_backend: str = "auto"
    """'auto', 'te', 'varlen' or 'sdpa' (see megatron_hbp.mcore.attention)."""
    cp_backend: str = "auto"
    """Context-parallel attention for CP > 1 steps: 'ulysses' (all-to-all of heads: per-rank work
    and saved memory exactly 1/c), 'allgather' (K/V all-gather, the reference), 'te' (Transformer
    Engine's own CP) or 'auto' (te when installed and usable, else ulysses when the heads allow it,
    else allgather). See docs/cp.md."""
    loss_impl: str = "auto"
    """'megatron' (CE on logits), 'fused' (megatron_hbp.kernels linear + CE, no logits; stable loss
    only) or 'auto' (fused on CUDA with step_token_mean, else megatron)."""
    layer_kernels: str = "auto"
    """Transformer-layer RMSNorm / SwiGLU / RoPE: 'torch' (Megatron local spec, unfused), 'triton'
    (megatron_hbp.kernels; CUDA, or CPU under TRITON_INTERPRET=1) or 'auto' (Transformer Engine's
    norm and activation when installed, else triton on CUDA, else torch). With 'triton' the fused
    loss (loss_impl fused) runs its Triton kernel too. See docs/kernels.md."""
    metrics_file: str | None = None
    """JSONL file with one record per step (``--metrics-file`` overrides)."""
    tensorboard_dir: str | None = None
    """TensorBoard log folder (used when tensorboard is installed)."""
    log_interval: int = 1
    """Print a console line every N steps."""
    memory_limit_gb: float | None = None
    """Device memory for the pre-flight OOM check (None: the GPU's memory; no check on CPU)."""
    check_loss_tokens: bool = True
    """Check every step that Megatron's all-reduced loss denominator equals the plan's (stable-loss proof; one line naming step and rank if not)."""

    def __post_init__(self):
        if self.model is None and self.init_from is None:
            raise ConfigError("set model (a preset, model YAML or HF folder) or init_from (a HF folder)")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ConfigError(
                f"loss_normalization '{self.loss_normalization}' unknown; choose {', '.join(LOSS_NORMALIZATIONS)}"
            )
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"dtype '{self.dtype}': use auto, bf16 or fp32")
        if self.attention_backend not in ("auto", "te", "varlen", "sdpa"):
            raise ConfigError(f"attention_backend '{self.attention_backend}': use auto, te, varlen or sdpa")
        if self.cp_backend not in CP_BACKENDS:
            raise ConfigError(f"cp_backend '{self.cp_backend}': use {', '.join(CP_BACKENDS)}")
        if self.layer_kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"layer_kernels '{self.layer_kernels}': use auto, triton or torch")
        if self.loss_impl not in ("auto", "megatron", "fused"):
            raise ConfigError(f"loss_impl '{self.loss_impl}': use auto, megatron or fused")
        if self.loss_impl == "fused" and self.loss_normalization != "step_token_mean":
            raise ConfigError("loss_impl 'fused' only supports loss_normalization 'step_token_mean'")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.log_interval < 1:
            raise ConfigError(f"log_interval must be >= 1, got {self.log_interval}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")

    @property
    def model_source(self) -> str:
        """What the model shapes are read from: ``model``, or ``init_from`` when model is unset."""
        return self.model if self.model is not None else self.init_from


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a run YAML and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    check_overrides(TrainConfig, overrides or [])  # a bad --set is reported as such
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' must look like key.sub=value")
        key, value = ov.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{ov}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return from_dict(TrainConfig, data, where=str(path))


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PlanSource",
    "TrainConfig",
    "load_train_config",
    "load_yaml",
    "replace",
]
