"""Plan configuration: frozen dataclasses that map one to one onto ``configs/plan_*.yaml``.

Read a file with ``load_plan_config(path)`` (unknown keys are errors, via
``megatron_hbp.configio``); every value is checked in ``__post_init__`` with a message
that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_hbp.configio import ConfigError, from_dict, load_yaml

PACKERS = ("isf", "bfd")
BALANCERS = ("none", "sort", "lpt")
LAST_STEP_POLICIES = ("shrink", "pad", "drop")
TOO_LONG_POLICIES = ("drop", "error")


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """One level of the hierarchy: samples with ``prev.pack_length < len <= pack_length``."""

    pack_length: int
    """Capacity of one pack in tokens (after CP padding of each sample)."""
    cp: int = 1
    """Context-parallel degree of every step of this group (a replica = ``cp`` consecutive ranks)."""
    recompute_layers: int = 0
    """Transformer layers with activation recomputation when running this group (trainer setting)."""
    micro_batches: int | None = None
    """Micro-batches per replica per step for this group; overrides PlanConfig.micro_batches_per_step."""

    def __post_init__(self):
        if self.pack_length <= 0:
            raise ConfigError(f"group pack_length must be positive, got {self.pack_length}")
        if self.cp <= 0:
            raise ConfigError(f"group cp must be >= 1, got {self.cp}")
        if self.cp > 1 and self.pack_length % (2 * self.cp):
            raise ConfigError(
                f"group pack_length={self.pack_length} with cp={self.cp}: pack_length must be a multiple "
                f"of 2*cp={2 * self.cp} (load-balanced CP cuts every sample into 2*cp chunks); "
                f"use e.g. pack_length={(self.pack_length // (2 * self.cp) + 1) * 2 * self.cp}"
            )
        if self.recompute_layers < 0:
            raise ConfigError(f"group recompute_layers must be >= 0, got {self.recompute_layers}")
        if self.micro_batches is not None and self.micro_batches <= 0:
            raise ConfigError(f"group micro_batches must be >= 1 (or omitted), got {self.micro_batches}")

    @property
    def pad_multiple(self) -> int:
        """Every sample of this group is padded to a multiple of this (2*cp, or 1 without CP)."""
        return 2 * self.cp if self.cp > 1 else 1


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Everything the planner needs besides the per-sample lengths."""

    groups: list[GroupConfig]
    """Groups in strictly increasing pack_length; a sample goes to the first group it fits."""
    world_size: int
    """Data x context parallel ranks (= GPUs / (TP * PP)); each group has world_size / cp replicas."""
    micro_batches_per_step: int | None = None
    """Gradient-accumulation micro-batches per replica per step (set this or tokens_per_step)."""
    tokens_per_step: int | None = None
    """Global pack capacity per step; per group micro-batches = tokens_per_step / (replicas * pack_length)."""
    tokens_per_gpu: int | None = None
    """If set, every group must run pack_length / cp == tokens_per_gpu tokens per GPU per micro-batch."""
    packer: str = "bfd"
    """'isf' (the paper's iterative sampling and filtering baseline) or 'bfd' (best-fit decreasing)."""
    isf_threshold: float = 0.989
    """ISF keeps a pack when it is at least this full; the rest is re-shuffled and re-packed."""
    isf_iterations: int = 10
    """ISF rounds; the last round keeps every pack."""
    greedy_fill: bool = True
    """Fill the free space of each group's packs with samples of the shorter groups (best fit)."""
    balance: str = "lpt"
    """'none' (random order), 'sort' (the paper: sort packs by sum l^2, cut into steps), or 'lpt'."""
    cost_linear_coef: float = 0.0
    """a in the balancing cost a*tokens + sum(l^2) of a pack (0 = attention only; ~57344 for LLaMA-8B)."""
    balance_swap_iterations: int = 64
    """Max pairwise-swap refinement rounds per step after LPT ('lpt' only)."""
    curriculum_steps: int = 0
    """The first K steps draw only from groups with pack_length <= curriculum_max_pack_length."""
    curriculum_max_pack_length: int | None = None
    """Largest pack_length allowed during the curriculum (default: the smallest group's)."""
    last_step: str = "shrink"
    """Leftover packs of a group that do not fill a step: 'shrink' (one more step with
    ceil(leftover / replicas) micro-batches, the missing packs empty: nothing dropped), 'pad' (one
    more full step filled with empty packs), 'drop' (leftover packs chosen at random per epoch,
    their samples listed as dropped; a group with samples still gets at least one step)."""
    too_long: str = "drop"
    """Samples longer than the largest group: 'drop' (listed with a reason) or 'error'."""
    epochs: int = 1
    """Passes over the data; each epoch is packed and balanced with its own seed."""
    seed: int = 0
    """Seed of every random choice (numpy Generator); same seed -> byte-identical plan."""
    extra: dict = field(default_factory=dict)
    """Free-form notes kept in the plan (not used)."""

    def __post_init__(self):
        if not self.groups:
            raise ConfigError("plan config: 'groups' must list at least one {pack_length, cp}")
        if self.world_size <= 0:
            raise ConfigError(f"plan config: world_size must be positive, got {self.world_size}")
        prev = 0
        for i, g in enumerate(self.groups):
            if g.pack_length <= prev:
                raise ConfigError(
                    f"plan config: groups[{i}].pack_length={g.pack_length} must be larger than the previous "
                    f"group's ({prev}); list groups in strictly increasing pack_length"
                )
            prev = g.pack_length
            if self.world_size % g.cp:
                raise ConfigError(
                    f"plan config: groups[{i}].cp={g.cp} does not divide world_size={self.world_size}; "
                    f"choose cp among the divisors of world_size"
                )
            if self.tokens_per_gpu is not None and g.pack_length != self.tokens_per_gpu * g.cp:
                raise ConfigError(
                    f"plan config: groups[{i}] runs pack_length/cp = {g.pack_length / g.cp:g} tokens per GPU but "
                    f"tokens_per_gpu={self.tokens_per_gpu}; set pack_length={self.tokens_per_gpu * g.cp} or "
                    f"drop tokens_per_gpu"
                )
        both_or_none = (self.micro_batches_per_step is None) == (self.tokens_per_step is None)
        all_groups_set = self.micro_batches_per_step is None and all(g.micro_batches for g in self.groups)
        if both_or_none and not all_groups_set:
            raise ConfigError(
                "plan config: set exactly one of micro_batches_per_step and tokens_per_step "
                "(or micro_batches in every group)"
            )
        if self.micro_batches_per_step is not None and self.micro_batches_per_step <= 0:
            raise ConfigError(
                f"plan config: micro_batches_per_step must be >= 1, got {self.micro_batches_per_step}"
            )
        if self.tokens_per_step is not None:
            for i, g in enumerate(self.groups):
                if g.micro_batches is not None:
                    continue
                per_mb = self.world_size // g.cp * g.pack_length
                if self.tokens_per_step % per_mb:
                    raise ConfigError(
                        f"plan config: tokens_per_step={self.tokens_per_step} is not a multiple of "
                        f"groups[{i}]'s micro-batch capacity (world_size/cp * pack_length = {per_mb}); "
                        f"use a multiple of {per_mb} or set groups[{i}].micro_batches"
                    )
        if self.packer not in PACKERS:
            raise ConfigError(
                f"plan config: packer '{self.packer}' unknown; choose one of {', '.join(PACKERS)}"
            )
        if self.balance not in BALANCERS:
            raise ConfigError(
                f"plan config: balance '{self.balance}' unknown; choose one of {', '.join(BALANCERS)}"
            )
        if self.last_step not in LAST_STEP_POLICIES:
            raise ConfigError(
                f"plan config: last_step '{self.last_step}' unknown; choose one of {', '.join(LAST_STEP_POLICIES)}"
            )
        if self.too_long not in TOO_LONG_POLICIES:
            raise ConfigError(
                f"plan config: too_long '{self.too_long}' unknown; choose one of {', '.join(TOO_LONG_POLICIES)}"
            )
        if not 0.0 < self.isf_threshold <= 1.0:
            raise ConfigError(f"plan config: isf_threshold must be in (0, 1], got {self.isf_threshold}")
        if self.isf_iterations < 1:
            raise ConfigError(f"plan config: isf_iterations must be >= 1, got {self.isf_iterations}")
        if self.cost_linear_coef < 0:
            raise ConfigError(f"plan config: cost_linear_coef must be >= 0, got {self.cost_linear_coef}")
        if self.balance_swap_iterations < 0:
            raise ConfigError("plan config: balance_swap_iterations must be >= 0")
        if self.curriculum_steps < 0:
            raise ConfigError(f"plan config: curriculum_steps must be >= 0, got {self.curriculum_steps}")
        if (
            self.curriculum_max_pack_length is not None
            and self.curriculum_max_pack_length < self.groups[0].pack_length
        ):
            raise ConfigError(
                f"plan config: curriculum_max_pack_length={self.curriculum_max_pack_length} is below the smallest "
                f"group ({self.groups[0].pack_length}); no step could be scheduled during the curriculum"
            )
        if self.epochs < 1:
            raise ConfigError(f"plan config: epochs must be >= 1, got {self.epochs}")
        if self.seed < 0:
            raise ConfigError(f"plan config: seed must be >= 0 (a numpy seed), got {self.seed}")

    def replicas(self, g: int) -> int:
        """Data-parallel replicas of group ``g`` (world_size / cp)."""
        return self.world_size // self.groups[g].cp

    def micro_batches(self, g: int) -> int:
        """Micro-batches per replica per (full) step of group ``g``."""
        grp = self.groups[g]
        if grp.micro_batches is not None:
            return grp.micro_batches
        if self.micro_batches_per_step is not None:
            return self.micro_batches_per_step
        return self.tokens_per_step // (self.replicas(g) * grp.pack_length)

    @property
    def curriculum_limit(self) -> int:
        """Largest pack_length used during the curriculum steps."""
        if self.curriculum_max_pack_length is not None:
            return self.curriculum_max_pack_length
        return self.groups[0].pack_length


def load_plan_config(path: str | Path, overrides: dict | None = None) -> PlanConfig:
    """Read a plan YAML file (see ``configs/plan_*.yaml``) into a validated PlanConfig.

    ``overrides`` replaces top-level keys after reading (e.g. ``{"balance": "sort"}``).
    """
    if not overrides:
        return load_yaml(PlanConfig, path)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data.update(overrides)
    return from_dict(PlanConfig, data, where=f"{path} (with overrides {overrides})")


def parse_overrides(spec: str) -> dict:
    """``"balance=sort,greedy_fill=false"`` -> ``{"balance": "sort", "greedy_fill": False}`` (YAML values)."""
    out = {}
    for item in filter(None, spec.split(",")):
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out
