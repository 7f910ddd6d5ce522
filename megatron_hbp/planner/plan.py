"""The plan: steps -> replicas -> micro-batches -> packs -> sample indices.

Storage is a handful of flat NumPy arrays (``Plan.arrays``) in training order, so a plan over
10M samples costs ~10 bytes per sample in memory and on disk; the object view
(``Step``/``Replica``/``MicroBatch``/``Pack``) is built lazily, one step at a time.

Array layout (``P`` packs, ``S`` steps, ``M`` placed samples, ``D`` dropped records):
- ``samples [M]`` int32/int64 sample indices, pack by pack; ``lengths [M]`` int32 their real lengths.
- ``pack_offsets [P+1]`` int64: pack ``p`` = ``samples[pack_offsets[p]:pack_offsets[p+1]]`` (may be empty).
- ``pack_loss_tokens [P]`` int64.
- ``step_pack_offsets [S+1]`` int64: step ``s`` = packs ``[step_pack_offsets[s], step_pack_offsets[s+1])``,
  replica-major: replica ``r``, micro-batch ``k`` is pack ``start + r*m + k``.
- ``step_group [S]`` int32, ``step_micro_batches [S]`` int32, ``step_epoch [S]`` int32,
  ``step_loss_tokens [S]`` int64.
- ``dropped_indices [D]`` int64, ``dropped_reasons [D]`` int8 (index into ``DROP_REASONS``),
  ``dropped_epochs [D]`` int32.

``Plan.workload`` (``megatron_hbp.planner.workload``) is each rank's share of every step (CP
degree and rank, padded lengths, loss tokens, Σl², attention pairs), derived once from these
arrays on first use; everything downstream reads it instead of recounting.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from megatron_hbp.configio import from_dict, to_dict
from megatron_hbp.planner.config import GroupConfig, PlanConfig
from megatron_hbp.planner.workload import Workload, derive_workload

PLAN_FORMAT = "megatron-hbp-plan"
PLAN_VERSION = 1
DROP_REASONS = ("too_long", "partial_step")
"""too_long: longer than the largest group's pack_length; partial_step: in a leftover pack of a
group that did not fill a whole step, chosen at random (policy last_step=drop)."""

ARRAY_KEYS = (
    "samples",
    "lengths",
    "pack_offsets",
    "pack_loss_tokens",
    "step_pack_offsets",
    "step_group",
    "step_micro_batches",
    "step_epoch",
    "step_loss_tokens",
    "dropped_indices",
    "dropped_reasons",
    "dropped_epochs",
)


class PlanMismatchError(ValueError):
    """A plan is used with sample info (or lengths) other than the one it was built from."""


class PlanFormatError(ValueError):
    """A plan file is not a megatron-hbp plan, or has a version this code cannot read."""


def lengths_digest(lengths: np.ndarray) -> str:
    """SHA-256 of the lengths as little-endian int32 (identifies the data a plan was built for)."""
    return hashlib.sha256(np.ascontiguousarray(lengths, dtype="<i4").tobytes()).hexdigest()


@dataclass(frozen=True)
class Pack:
    """One packed sequence (THD): documents back to back, each padded to ``pad_multiple``."""

    sample_indices: np.ndarray
    """``[n] int64`` indices into the sample info, in pack order."""
    lengths: np.ndarray
    """``[n] int32`` real lengths."""
    padded_lengths: np.ndarray
    """``[n] int32`` lengths rounded up to a multiple of 2*cp (== lengths when cp == 1)."""
    cu_seqlens: np.ndarray
    """``[n+1] int32`` cumulative real lengths."""
    cu_seqlens_padded: np.ndarray
    """``[n+1] int32`` cumulative padded lengths (<= pack_length)."""
    loss_tokens: int
    """Loss tokens of the pack's samples."""
    pack_length: int
    """Capacity of the pack (the group's pack_length)."""
    cp: int
    """Context-parallel degree of the pack's step."""

    @property
    def num_tokens(self) -> int:
        """Real tokens in the pack."""
        return int(self.cu_seqlens[-1])

    def __len__(self) -> int:
        return len(self.sample_indices)


@dataclass(frozen=True)
class MicroBatch:
    """What one replica runs in one forward/backward: usually exactly one pack."""

    packs: list[Pack]


@dataclass(frozen=True)
class Replica:
    """One CP group of a step: world ranks ``[index*cp, (index+1)*cp)``."""

    index: int
    cp: int
    micro_batches: list[MicroBatch]

    @property
    def ranks(self) -> range:
        """World (DP x CP) ranks forming this replica."""
        return range(self.index * self.cp, (self.index + 1) * self.cp)


class Step:
    """One optimizer step; every replica runs ``micro_batches_per_replica`` micro-batches."""

    def __init__(self, plan: Plan, index: int):
        a = plan.arrays
        self._plan = plan
        self.index = index
        self.group = int(a["step_group"][index])
        g: GroupConfig = plan.groups[self.group]
        self.pack_length = g.pack_length
        self.cp = g.cp
        self.recompute_layers = g.recompute_layers
        self.micro_batches_per_replica = int(a["step_micro_batches"][index])
        self.num_replicas = plan.world_size // g.cp
        self.epoch = int(a["step_epoch"][index])
        self.loss_tokens = int(a["step_loss_tokens"][index])
        self._p0 = int(a["step_pack_offsets"][index])
        self._p1 = int(a["step_pack_offsets"][index + 1])
        self.num_tokens = int(plan.workload.step_tokens[index])

    def pack(self, p: int) -> Pack:
        """Pack ``p`` of the whole plan (must belong to this step) as an object."""
        a = self._plan.arrays
        s0, s1 = int(a["pack_offsets"][p]), int(a["pack_offsets"][p + 1])
        lens = a["lengths"][s0:s1].astype(np.int32)
        base = int(a["pack_offsets"][0])
        padded = self._plan.workload.padded_lengths[s0 - base : s1 - base]
        cu = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu[1:])
        cup = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(padded, out=cup[1:])
        return Pack(
            sample_indices=a["samples"][s0:s1].astype(np.int64),
            lengths=lens,
            padded_lengths=padded,
            cu_seqlens=cu,
            cu_seqlens_padded=cup,
            loss_tokens=int(a["pack_loss_tokens"][p]),
            pack_length=self.pack_length,
            cp=self.cp,
        )

    @cached_property
    def replicas(self) -> list[Replica]:
        """``world_size // cp`` replicas, each with ``micro_batches_per_replica`` micro-batches."""
        m = self.micro_batches_per_replica
        return [
            Replica(
                index=r,
                cp=self.cp,
                micro_batches=[MicroBatch(packs=[self.pack(self._p0 + r * m + k)]) for k in range(m)],
            )
            for r in range(self.num_replicas)
        ]

    def replica(self, r: int) -> Replica:
        """Replica ``r`` only (cheaper than ``replicas`` when a rank needs its own share)."""
        m = self.micro_batches_per_replica
        return Replica(
            index=r,
            cp=self.cp,
            micro_batches=[MicroBatch(packs=[self.pack(self._p0 + r * m + k)]) for k in range(m)],
        )

    def __repr__(self) -> str:
        return (
            f"Step(index={self.index}, group={self.group}, pack_length={self.pack_length}, cp={self.cp}, "
            f"replicas={self.num_replicas}, micro_batches={self.micro_batches_per_replica}, "
            f"tokens={self.num_tokens}, loss_tokens={self.loss_tokens})"
        )


@dataclass(frozen=True)
class Dropped:
    """Samples left out of an epoch, each with a reason (``DROP_REASONS``)."""

    indices: np.ndarray
    """``[D] int64`` sample indices."""
    reason_codes: np.ndarray
    """``[D] int8`` index into DROP_REASONS."""
    epochs: np.ndarray
    """``[D] int32`` epoch in which the sample was dropped."""

    @property
    def reasons(self) -> np.ndarray:
        """``[D]`` reason names."""
        return np.asarray(DROP_REASONS)[self.reason_codes.astype(np.int64)]

    def counts(self) -> dict[str, int]:
        """Dropped records per reason (all epochs)."""
        c = np.bincount(self.reason_codes.astype(np.int64), minlength=len(DROP_REASONS))
        return {name: int(c[i]) for i, name in enumerate(DROP_REASONS)}

    def __len__(self) -> int:
        return len(self.indices)


class Plan:
    """A saved or freshly built plan. Build with ``build_plan``, read with ``load_plan``."""

    def __init__(
        self,
        *,
        config: PlanConfig,
        arrays: dict[str, np.ndarray],
        num_samples: int,
        fingerprint: str | None,
        lengths_sha256: str,
        stats: dict | None = None,
    ):
        missing = [k for k in ARRAY_KEYS if k not in arrays]
        if missing:
            raise PlanFormatError(f"plan is missing arrays {missing}")
        self.config = config
        self.arrays = arrays
        self.num_samples = num_samples
        self.fingerprint = fingerprint
        self.lengths_sha256 = lengths_sha256
        self.stats = stats or {}
        """In-memory statistics of the build (timings, balancer comparison); not saved."""

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def groups(self) -> list[GroupConfig]:
        return list(self.config.groups)

    @property
    def num_steps(self) -> int:
        return len(self.arrays["step_group"])

    def __len__(self) -> int:
        return self.num_steps

    @cached_property
    def workload(self) -> Workload:
        """Each rank's share of every step (``megatron_hbp.planner.workload``), derived once."""
        return derive_workload(
            self.arrays,
            [g.cp for g in self.config.groups],
            [g.recompute_layers for g in self.config.groups],
            self.world_size,
        )

    def step(self, i: int) -> Step:
        """Step ``i`` (0-based, training order); negative indices count from the end."""
        n = self.num_steps
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"step {i} out of range: the plan has {n} steps")
        return Step(self, i)

    def __iter__(self):
        for i in range(self.num_steps):
            yield Step(self, i)

    @property
    def dropped(self) -> Dropped:
        a = self.arrays
        return Dropped(
            indices=a["dropped_indices"].astype(np.int64),
            reason_codes=a["dropped_reasons"],
            epochs=a["dropped_epochs"],
        )

    def check_fingerprint(self, fingerprint: str | None) -> None:
        """Raise PlanMismatchError unless the plan was built from sample info with this fingerprint."""
        if self.fingerprint is None:
            raise PlanMismatchError(
                "this plan was built from bare lengths (no sample-info fingerprint) and cannot be checked "
                f"against sample info {fingerprint!r}; rebuild it with tools/plan.py --sample-info"
            )
        if fingerprint != self.fingerprint:
            raise PlanMismatchError(
                f"plan was built for sample info with fingerprint {self.fingerprint!r} but is used with "
                f"{fingerprint!r}: the data changed; rebuild the plan with tools/plan.py"
            )

    def check_lengths(self, lengths: np.ndarray) -> None:
        """Raise PlanMismatchError unless ``lengths`` are exactly the ones the plan was built from."""
        if len(lengths) != self.num_samples or lengths_digest(lengths) != self.lengths_sha256:
            raise PlanMismatchError(
                f"plan was built for {self.num_samples} samples with lengths digest {self.lengths_sha256[:12]}…, "
                f"got {len(lengths)} samples with digest {lengths_digest(lengths)[:12]}…; rebuild the plan"
            )

    def meta(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "num_samples": int(self.num_samples),
            "fingerprint": self.fingerprint,
            "lengths_sha256": self.lengths_sha256,
            "drop_reasons": list(DROP_REASONS),
            "config": to_dict(self.config),
        }

    def save(self, path: str | Path) -> Path:
        """Write the plan as a deterministic ``.npz`` (fixed zip timestamps: same plan -> same bytes)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = {"meta": np.array(json.dumps(self.meta(), sort_keys=True))}
        entries.update({k: self.arrays[k] for k in ARRAY_KEYS})
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(
            tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True
        ) as zf:
            for name, arr in entries.items():
                buf = io.BytesIO()
                arr = np.asarray(arr)
                if arr.ndim:  # ascontiguousarray would turn the 0-d meta string into shape (1,)
                    arr = np.ascontiguousarray(arr)
                np.lib.format.write_array(buf, arr, allow_pickle=False)
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue(), compresslevel=1)
        tmp.replace(path)
        return path


def load_plan(path: str | Path, *, fingerprint: str | None = None, lengths: np.ndarray | None = None) -> Plan:
    """Read a plan written by ``Plan.save``.

    Args:
        path: the ``plan.npz`` file (or a directory holding one).
        fingerprint: if given, the sample-info fingerprint the plan must have been built from.
        lengths: if given, the per-sample lengths the plan must have been built from.
    Raises:
        PlanFormatError: not a plan file / unknown version. PlanMismatchError: other data.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "plan.npz"
    if not path.is_file():
        raise FileNotFoundError(f"plan file not found: {path} (write one with tools/plan.py --output DIR)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise PlanFormatError(f"{path}: not a readable plan file ({e})") from None
    if "meta" not in data:
        raise PlanFormatError(f"{path}: no 'meta' entry; not a megatron-hbp plan")
    meta = json.loads(str(data.pop("meta").reshape(())))
    if meta.get("format") != PLAN_FORMAT:
        raise PlanFormatError(f"{path}: format {meta.get('format')!r}, expected {PLAN_FORMAT!r}")
    if meta.get("version") != PLAN_VERSION:
        raise PlanFormatError(
            f"{path}: plan format version {meta.get('version')}, this code reads version {PLAN_VERSION}; "
            "rebuild the plan with tools/plan.py"
        )
    config = from_dict(PlanConfig, meta["config"], where=f"{path}:config")
    plan = Plan(
        config=config,
        arrays=data,
        num_samples=int(meta["num_samples"]),
        fingerprint=meta.get("fingerprint"),
        lengths_sha256=meta["lengths_sha256"],
    )
    if fingerprint is not None:
        plan.check_fingerprint(fingerprint)
    if lengths is not None:
        plan.check_lengths(lengths)
    return plan
