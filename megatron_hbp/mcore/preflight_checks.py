"""Pre-flight checks of a launch's settings, run before anything heavy (no model, no data read).

Each check raises :class:`~megatron_hbp.configio.ConfigError` with one line that names the key
and the fix (``main`` prints it and exits 2) or returns warning lines for rank 0 to print:

- :func:`check_device_settings`: CUDA-only settings on a CPU launch (``attention_backend`` te /
  varlen, ``dtype`` bf16) are errors; ``loss_impl: fused`` on CPU and a ``tensorboard_dir``
  without TensorBoard installed are warnings.
- :func:`check_sample_info_override`: ``--set data.sample_info=PATH`` naming a missing file in
  a config that builds the demo data (the demo data is built only at the config's own path).
- :func:`dry_run_world`: the launch size a ``--dry-run`` under plain ``python`` simulates.
- :func:`quiet_other_ranks`: third-party import warnings (Megatron, Transformer Engine, Apex)
  are printed by rank 0 only.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import yaml

from megatron_hbp.configio import ConfigError

__all__ = [
    "check_device_settings",
    "check_sample_info_override",
    "dry_run_world",
    "launched",
    "quiet_other_ranks",
    "report_error_here",
    "tensorboard_available",
]


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # ImportError, or tensorboard's own import failures
        return False
    return True


def check_device_settings(cfg, *, on_cuda: bool) -> list[str]:
    """Errors for settings a CPU launch cannot run; warning lines for silent degradations."""
    out: list[str] = []
    if not on_cuda:
        if cfg.attention_backend in ("te", "varlen"):
            raise ConfigError(
                f"attention_backend={cfg.attention_backend} needs CUDA (this launch has no GPU); "
                "use attention_backend: auto or sdpa"
            )
        if cfg.dtype == "bf16":
            raise ConfigError(
                "dtype=bf16 needs a GPU (CPU runs compute in fp32); use dtype: auto (bf16 on GPU, fp32 on CPU) or fp32"
            )
        if cfg.loss_impl == "fused":
            out.append(
                "loss_impl=fused on CPU runs the fused kernel's slow CPU path (same loss); "
                "loss_impl: auto picks megatron on CPU"
            )
    if cfg.tensorboard_dir and not tensorboard_available():
        out.append(
            f"tensorboard_dir={cfg.tensorboard_dir} but TensorBoard is not installed: no TensorBoard logs "
            "(metrics still go to metrics_file); pip install tensorboard"
        )
    return out


def check_sample_info_override(config_path: str | os.PathLike, overrides: list[str], cfg) -> None:
    """A ``--set data.sample_info=PATH`` that names no file, in a config that would build the demo
    data there, is a typo until proven otherwise: the demo data is built only at the path the
    config file itself names, or where ``--set data.build_if_missing=true`` asks for it."""
    keys = [ov.split("=", 1)[0].strip() for ov in overrides]
    given = [ov.split("=", 1)[1] for k, ov in zip(keys, overrides) if k == "data.sample_info"]
    if not given or not (cfg.data.demo and cfg.data.build_if_missing) or "data.build_if_missing" in keys:
        return  # (building elsewhere on purpose: --set data.build_if_missing=true says so)
    path = cfg.data.sample_info
    if Path(path).exists():
        return
    own = ((yaml.safe_load(Path(config_path).read_text()) or {}).get("data") or {}).get("sample_info")
    if own is not None and str(own) == str(path):
        return
    raise ConfigError(
        f"--set data.sample_info={given[-1]}: no such file, and {config_path} would build the demo data "
        f"there; the demo data is built only at the config's own path ({own}). Fix the path, or add "
        "--set data.build_if_missing=true to build it there on purpose"
    )


def report_error_here(error: Exception) -> bool:
    """Print ``error`` on this rank? A ConfigError comes from the config and the command line,
    the same on every rank: only rank 0 prints it (one line, not one per rank)."""
    return not (isinstance(error, ConfigError) and int(os.environ.get("RANK", "0") or 0) > 0)


def launched() -> bool:
    """Started by torchrun / Slurm (else: a plain single process)."""
    env = os.environ
    return ("RANK" in env and "WORLD_SIZE" in env) or ("SLURM_PROCID" in env and "SLURM_NTASKS" in env)


def dry_run_world(cfg, nproc: int | None) -> int:
    """Processes a ``--dry-run`` from plain ``python`` simulates: ``--nproc``, else the plan's
    world size times tp*pp (the plan file, else ``plan.world_size``, else the plan config's)."""
    if nproc is not None:
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        return nproc
    mp = cfg.parallel.tp * cfg.parallel.pp
    path = Path(cfg.plan.path)
    if path.is_dir():
        path = path / "plan.npz"
    if path.is_file():
        from megatron_hbp.planner import load_plan

        return load_plan(path).world_size * mp
    if cfg.plan.world_size is not None:
        return cfg.plan.world_size * mp
    if cfg.plan.config and Path(cfg.plan.config).is_file():
        ws = (yaml.safe_load(Path(cfg.plan.config).read_text()) or {}).get("world_size")
        if isinstance(ws, int) and ws > 0:
            return ws * mp
    return 1


_QUIET = r"(megatron|transformer_engine|apex)(\.|$)"


def quiet_other_ranks(rank: int) -> None:
    """On ranks other than 0, silence the warnings third-party imports print (once per rank
    otherwise: N copies of the same Transformer Engine / Apex / deprecation notices)."""
    if rank == 0:
        return
    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET)
    for name in ("megatron", "transformer_engine", "apex"):
        logging.getLogger(name).setLevel(logging.ERROR)
