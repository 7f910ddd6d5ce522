"""GPU and cluster profiles for the cost model (editable YAML data, sources in the files).

Profiles live in ``megatron_hbp/costmodel/hardware/<name>.yaml`` (``h100_sxm``, ``h200``, ...);
``load_hardware(name_or_path)`` accepts a preset name or a path to a YAML file with the
same keys. Units: TFLOP/s = 1e12 FLOP/s, GB/s = 1e9 bytes/s, GiB = 2**30 bytes.

Code-path profiles (``hardware/paths/*.yaml``) are read by ``megatron_hbp.costmodel.paths``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_hbp.configio import ConfigError, load_yaml

HARDWARE_DIR = Path(__file__).parent / "hardware"


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """One GPU type and the node it sits in."""

    name: str
    """Profile name (informational)."""
    bf16_dense_tflops: float
    """Peak dense BF16 tensor-core throughput, TFLOP/s (datasheet value without sparsity)."""
    hbm_gb_per_s: float
    """Peak HBM bandwidth, GB/s."""
    memory_gib: float
    """GPU memory visible to the process, GiB."""
    nvlink_gb_per_s: float
    """Intra-node GPU-to-GPU bandwidth per GPU and direction, GB/s."""
    internode_gb_per_s: float
    """Inter-node network bandwidth per GPU and direction, GB/s."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain (default for clusters built from this GPU)."""
    device_names: tuple[str, ...] = ()
    """Substrings of the CUDA device name (``torch.cuda.get_device_name``, case-insensitive) of this
    GPU: the trainer's memory check and its MFU find the profile by them
    (``hardware_for_device_name``)."""

    def __post_init__(self):
        for name in (
            "bf16_dense_tflops",
            "hbm_gb_per_s",
            "memory_gib",
            "nvlink_gb_per_s",
            "internode_gb_per_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"hardware '{self.name}': {name} must be positive, got {getattr(self, name)}"
                )
        if self.gpus_per_node < 1:
            raise ConfigError(f"hardware '{self.name}': gpus_per_node must be >= 1, got {self.gpus_per_node}")

    @property
    def peak_flops(self) -> float:
        """Peak dense BF16 FLOP/s."""
        return self.bf16_dense_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """The GPUs a job runs on."""

    gpu: str = "h100_sxm"
    """Hardware profile name or YAML path (see ``available_hardware()``)."""
    num_gpus: int = 32
    """GPUs in the job."""
    gpus_per_node: int | None = None
    """GPUs per node (NVLink domain); defaults to the profile's value."""

    def __post_init__(self):
        if self.num_gpus < 1:
            raise ConfigError(f"cluster: num_gpus must be >= 1, got {self.num_gpus}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ConfigError(f"cluster: gpus_per_node must be >= 1, got {self.gpus_per_node}")

    def hardware(self) -> HardwareProfile:
        return load_hardware(self.gpu)

    def node_size(self) -> int:
        return self.gpus_per_node or self.hardware().gpus_per_node


def available_hardware() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> HardwareProfile:
    """A profile by name (``h100_sxm``, ``h200``; ``h100`` is an alias) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml(HardwareProfile, path)
    name = {"h100": "h100_sxm"}.get(str(name_or_path).lower(), str(name_or_path).lower())
    preset = HARDWARE_DIR / f"{name}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"unknown hardware profile '{name_or_path}'. Available: {', '.join(available_hardware())}; "
            "or give the path of a YAML file with HardwareProfile keys"
        )
    return load_yaml(HardwareProfile, preset)


def hardware_for_device_name(device_name: str) -> HardwareProfile | None:
    """The shipped profile whose ``device_names`` occur in ``device_name`` (e.g. ``"NVIDIA H100 80GB
    HBM3"`` -> ``h100_sxm``), or None for a GPU without a profile. The one place a GPU name maps to
    its peak FLOP/s and memory (the trainer's memory check and MFU both read it). Raises
    ``ConfigError`` when two profiles claim the same name."""
    upper = device_name.upper()
    found = [
        hw
        for hw in (load_hardware(name) for name in available_hardware())
        if any(key.upper() in upper for key in hw.device_names)
    ]
    if len(found) > 1:
        raise ConfigError(
            f"device '{device_name}' matches the device_names of several hardware profiles "
            f"({', '.join(hw.name for hw in found)}); make them distinct in {HARDWARE_DIR}"
        )
    return found[0] if found else None
