"""Code-path profiles: the efficiencies and implementation knobs of one training code path.

They live in ``megatron_hbp/costmodel/hardware/paths/<name>.yaml``, e.g. ``trainer_h100`` (this
repository's trainer, calibrated on an H100) and ``te`` (a Transformer Engine path: the cost
model's defaults). ``load_path_profile(name_or_path)`` reads one; ``PathProfile.resolve`` turns it
into the cost model's ``Efficiency`` and ``TrainingSetup`` (hence this module sits above both
``hardware`` and ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_hbp.configio import ConfigError, from_dict, load_yaml
from megatron_hbp.costmodel.hardware import HARDWARE_DIR
from megatron_hbp.costmodel.model import Efficiency, TrainingSetup

PATHS_DIR = HARDWARE_DIR / "paths"
DEFAULT_PATH_PROFILE = "trainer_h100"


@dataclass(frozen=True, kw_only=True)
class PathProfile:
    """The efficiencies and implementation knobs of one training code path (what the simulator and
    ``select_groups`` assume the job runs)."""

    name: str
    """Profile name (printed by the tools)."""
    description: str = ""
    """One line: which code path this is."""
    source: str = ""
    """Where the numbers come from (measurement files, command)."""
    efficiency: dict = field(default_factory=dict)
    """``Efficiency`` fields that differ from its defaults."""
    setup: dict = field(default_factory=dict)
    """``TrainingSetup`` fields that differ from its defaults."""

    def resolve(self, efficiency: dict | None = None, setup: dict | None = None):
        """(``Efficiency``, ``TrainingSetup``) of this profile with ``efficiency`` / ``setup`` overrides
        on top (e.g. ``--set``); unknown keys or bad values raise ``ConfigError`` naming the profile."""
        for section in ("efficiency", "setup"):
            if not isinstance(getattr(self, section), dict):
                raise ConfigError(f"path profile '{self.name}': {section} must be a mapping")
        eff = from_dict(
            Efficiency,
            {**self.efficiency, **(efficiency or {})},
            where=f"path profile '{self.name}' efficiency",
        )
        st = from_dict(
            TrainingSetup, {**self.setup, **(setup or {})}, where=f"path profile '{self.name}' setup"
        )
        return eff, st


def available_path_profiles() -> list[str]:
    return sorted(p.stem for p in PATHS_DIR.glob("*.yaml"))


def load_path_profile(name_or_path: str | Path) -> PathProfile:
    """A code-path profile by name (``trainer_h100``, ``te``) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        prof = load_yaml(PathProfile, path)
    else:
        preset = PATHS_DIR / f"{str(name_or_path).lower()}.yaml"
        if not preset.is_file():
            raise ConfigError(
                f"unknown path profile '{name_or_path}'. Available: {', '.join(available_path_profiles())}; "
                "or give the path of a YAML file with PathProfile keys (name, efficiency, setup)"
            )
        prof = load_yaml(PathProfile, preset)
    prof.resolve()  # validate its keys now, with the profile's name in the message
    return prof
