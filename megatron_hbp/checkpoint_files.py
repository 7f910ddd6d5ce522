"""Checkpoint files a cluster user can trust: weights-only loading, atomic step folders, manifests.

Used by the trainer (``megatron_hbp.mcore.checkpoint``) and the converter
(``megatron_hbp.convert.checkpoint``); imports only torch and the standard library.

- :func:`safe_load` reads a ``torch.save`` file with ``weights_only=True``: tensors, numbers,
  strings and plain containers only. A file whose pickle names any other Python object (which
  could run code when unpickled) is refused with :class:`UnsafeCheckpointError`; nothing in it runs.
- A step folder is written as ``step_<N>.tmp``, every file fsynced, ``manifest.json`` (format,
  steps done, each file's size and sha256) written last, then renamed to ``step_<N>`` and the
  checkpoint dir's ``latest`` replaced atomically. A folder without a manifest was never finished.
- :func:`verify_step` checks a step folder against its manifest and names the first bad file;
  :func:`select_step` picks the newest good ``step_<N>`` of a checkpoint dir, skipping (and
  reporting) unfinished or corrupt ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

FORMAT = "megatron-hbp-checkpoint/2"
MANIFEST = "manifest.json"
STEP_RE = re.compile(r"^step_(\d+)$")
TMP_SUFFIX = ".tmp"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint was made for another plan, model or parallel layout."""


class CheckpointCorruptError(ValueError):
    """A step folder is unfinished, a file is missing, truncated, or its checksum differs."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects that are not weights (loading them could run code)."""


# ----------------------------------------------------------------------------- loading


def safe_load(path, *, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` on CPU; a pickle naming other objects is refused.

    Raises :class:`UnsafeCheckpointError` (one line: the file and the object it names) for a
    file that is not weights-only, :class:`CheckpointCorruptError` for one torch cannot read.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", msg)
        if m:
            what = f"it names {m.group(1)}"
        else:  # the line torch gives after the generic preamble
            lines = [x.strip() for x in msg.splitlines() if x.strip()]
            what = (lines[1] if len(lines) > 1 else lines[0] if lines else "unknown")[:200]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds a Python object that is not a tensor or plain "
            f"container ({what}); unpickling it could run code. Checkpoints are read weights-only: "
            "use a checkpoint saved by this version of megatron-hbp, from a source you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointCorruptError(f"{path}: cannot be read as a torch checkpoint ({first})") from None


# ----------------------------------------------------------------------------- writing


def fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path) -> None:
    """Persist a folder's entries (a rename or a new file) where the OS supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_entry(path) -> dict:
    """``{"size", "sha256"}`` of a written file, after it was flushed to disk."""
    fsync_file(path)
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def tmp_step_dir(directory, steps_done: int) -> Path:
    return Path(directory) / f"step_{steps_done}{TMP_SUFFIX}"


def begin_step(directory, steps_done: int) -> Path:
    """Create an empty ``step_<N>.tmp`` (removing a leftover of an earlier, killed save)."""
    tmp = tmp_step_dir(directory, steps_done)
    Path(directory).mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_step(directory, steps_done: int, files: dict, info: dict) -> Path:
    """Write the manifest into ``step_<N>.tmp``, rename it to ``step_<N>``, update ``latest``.

    ``files``: name -> :func:`file_entry` of every file in the folder; ``info``: extra manifest
    keys (the run's metadata). An existing ``step_<N>`` is replaced only after the new one is
    complete.
    """
    directory = Path(directory)
    tmp = tmp_step_dir(directory, steps_done)
    final = directory / f"step_{steps_done}"
    missing = sorted(n for n in files if not (tmp / n).is_file())
    if missing:
        raise CheckpointCorruptError(f"{tmp}: files reported by the ranks are missing: {', '.join(missing)}")
    manifest = dict(info, format=FORMAT, steps_done=steps_done, files=dict(sorted(files.items())))
    write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = directory / f"step_{steps_done}.old{TMP_SUFFIX}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    fsync_dir(directory)
    write_text_atomic(directory / "latest", f"step_{steps_done}\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def prune(directory, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest complete ``step_<N>`` folders (0: keep all)."""
    if keep_last <= 0:
        return []
    steps = sorted(
        (int(m.group(1)), p)
        for p in Path(directory).iterdir()
        if p.is_dir() and (m := STEP_RE.match(p.name)) and (p / MANIFEST).is_file()
    )
    gone = [p for _, p in steps[:-keep_last]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------- verifying


def read_manifest(step_dir) -> dict:
    step_dir = Path(step_dir)
    if step_dir.name.endswith(TMP_SUFFIX):
        raise CheckpointCorruptError(f"{step_dir}: an unfinished save (the folder was never renamed)")
    f = step_dir / MANIFEST
    if not f.is_file():
        hint = (
            " (written before checkpoint format 2: its files are not weights-only)"
            if (step_dir / "meta.json").is_file()
            else ""
        )
        raise CheckpointCorruptError(f"{step_dir}: no {MANIFEST}, the save did not finish{hint}")
    try:
        manifest = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointCorruptError(f"{f}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointCorruptError(f"{f}: not a {FORMAT} manifest")
    return manifest


def verify_step(step_dir, *, checksum: list[str] | None = None) -> dict:
    """Check every file of the manifest exists with its size; sha256 of the files in ``checksum``
    (None: all). Returns the manifest; raises :class:`CheckpointCorruptError` naming the file."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir)
    files = manifest["files"]
    for name, entry in files.items():
        f = step_dir / name
        if not f.is_file():
            raise CheckpointCorruptError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CheckpointCorruptError(f"{f}: {size} bytes, {MANIFEST} says {entry['size']} (truncated?)")
    for name in files if checksum is None else checksum:
        f = step_dir / name
        if name not in files:
            raise CheckpointCorruptError(f"{f}: not listed in {MANIFEST}")
        if sha256_file(f) != files[name]["sha256"]:
            raise CheckpointCorruptError(f"{f}: sha256 differs from {MANIFEST} (the file is corrupt)")
    return manifest


def step_candidates(directory) -> list[Path]:
    """``step_<N>`` and unfinished ``step_<N>.tmp`` folders of a checkpoint dir, newest N first."""
    out = []
    for p in Path(directory).iterdir():
        name = p.name.removesuffix(TMP_SUFFIX)
        m = STEP_RE.match(name)
        if p.is_dir() and m:
            out.append((int(m.group(1)), p.name.endswith(TMP_SUFFIX), p))
    return [p for _, _, p in sorted(out, key=lambda t: (-t[0], t[1]))]


def is_step_dir(path) -> bool:
    path = Path(path)
    return (
        (path / MANIFEST).is_file()
        or (path / "meta.json").is_file()
        or bool(STEP_RE.match(path.name.removesuffix(TMP_SUFFIX)))
    )


def select_step(path, check=None, warn=print) -> Path:
    """The step folder to load from ``path``.

    ``path`` is a step folder (used as given: any problem is an error naming the file) or a
    checkpoint dir (its newest step folder that passes ``check``; each one skipped is reported
    with ``warn``). ``check(step_dir)`` raises :class:`CheckpointCorruptError`; default:
    :func:`verify_step` with every checksum.
    """
    path = Path(path)
    check = check or verify_step
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: the folder does not exist")
    if is_step_dir(path):
        check(path)
        return path
    skipped = []
    for cand in step_candidates(path):
        try:
            check(cand)
        except CheckpointCorruptError as e:
            skipped.append(cand.name)
            warn(f"[hbp] warning: skipping checkpoint {e}")
            continue
        return cand
    raise FileNotFoundError(
        f"no complete checkpoint in {path}"
        + (
            f" (skipped: {', '.join(skipped)})"
            if skipped
            else ": expected step_<N> folders with a manifest.json"
        )
    )


# ----------------------------------------------------------------------------- torch_dist folders
#
# A ``torch.distributed.checkpoint`` (DCP) folder, as Megatron's ``dist_checkpointing`` writes it
# (``torch_dist``): ``.metadata`` (a plain pickle: which tensor chunks and byte objects live where),
# ``__<rank>_<n>.distcp`` data files, and ``metadata.json``. DCP's reader unpickles ``.metadata``
# with ``pickle.load`` and every byte object (Megatron's ``ShardedObject``s, including the common
# state) with ``torch.load(weights_only=False)``: either could run code. :func:`check_dcp_folder`
# reads them first, ``.metadata`` with an unpickler that only knows the DCP metadata classes and
# the torch types they hold, the byte objects weights-only; anything else is refused.

DCP_METADATA = ".metadata"


def _dcp_allowed() -> dict:
    from torch.distributed.checkpoint import filesystem, metadata, planner

    allowed = {
        ("torch.distributed.checkpoint.metadata", n): getattr(metadata, n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
        if hasattr(metadata, n)
    }
    allowed.update(
        {
            ("torch.distributed.checkpoint.planner", n): getattr(planner, n)
            for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData")
            if hasattr(planner, n)
        }
    )
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    # maps a layout's name ("torch.strided") to the layout object, nothing else
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    # StorageMeta.checkpoint_id of a folder saved by plain torch.distributed.checkpoint
    allowed[("pathlib", "PosixPath")] = __import__("pathlib").PosixPath
    allowed[("pathlib", "PurePosixPath")] = __import__("pathlib").PurePosixPath
    return allowed


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` only: its dataclasses, ``torch.Size`` and torch dtypes /
    layouts / memory formats; any other global is refused before it is looked up or called."""

    def __init__(self, f, where: Path):
        super().__init__(f)
        self._where = where
        self._allowed = _dcp_allowed()

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self._where}: refused to load: the pickle names {module}.{name}, which is not a "
            "checkpoint-metadata class; unpickling it could run code. Use a checkpoint saved by "
            "this version of megatron-hbp, from a source you trust"
        )


def read_dcp_metadata(folder):
    """The ``Metadata`` of a DCP folder, read with the restricted unpickler."""
    f = Path(folder) / DCP_METADATA
    if not f.is_file():
        raise CheckpointCorruptError(f"{f}: missing (not a torch_dist checkpoint folder)")
    try:
        with open(f, "rb") as fh:
            md = _DcpMetadataUnpickler(fh, f).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointCorruptError(
            f"{f}: cannot be read as checkpoint metadata ({type(e).__name__}: {e})"
        ) from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointCorruptError(f"{f}: not torch.distributed.checkpoint metadata")
    return md


def _dcp_read(folder: Path, info) -> bytes:
    if getattr(info, "transform_descriptors", None):
        raise CheckpointCorruptError(
            f"{folder / info.relative_path}: compressed / transformed entries are not supported"
        )
    f = (folder / info.relative_path).resolve()
    if f.parent != folder.resolve():
        raise UnsafeCheckpointError(
            f"{folder / DCP_METADATA}: an entry points outside the folder ({info.relative_path})"
        )
    with open(f, "rb") as fh:
        fh.seek(info.offset)
        data = fh.read(info.length)
    if len(data) != info.length:
        raise CheckpointCorruptError(f"{f}: shorter than {DCP_METADATA} says (truncated?)")
    return data


def _weights_only_bytes(data: bytes, where: str):
    import io

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:unsupported|Unsupported global:) GLOBAL (\S+)", str(e))
        what = f"it names {m.group(1)}" if m else str(e).strip().splitlines()[0][:200]
        raise UnsafeCheckpointError(
            f"{where}: refused to load: the object holds a Python object that is not a tensor or plain "
            f"container ({what}); unpickling it could run code. Checkpoints are read weights-only: "
            "use a checkpoint saved by this version of megatron-hbp, from a source you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointCorruptError(f"{where}: cannot be read ({str(e).strip()[:200]})") from None


def check_dcp_folder(folder) -> None:
    """Refuse a torch_dist folder whose loading could run code: ``.metadata`` through the restricted
    unpickler, every byte object (``ShardedObject``) weights-only, a legacy ``common.pt``
    weights-only, no other pickle files. Raises :class:`UnsafeCheckpointError` naming the file."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    md = read_dcp_metadata(folder)
    for p in folder.iterdir():
        if p.name in (DCP_METADATA, "metadata.json") or p.suffix == ".distcp":
            continue
        if p.name == "common.pt":
            safe_load(p)
    byte_keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for idx, info in md.storage_data.items():
        if idx.fqn in byte_keys:
            _weights_only_bytes(_dcp_read(folder, info), f"{folder / info.relative_path} (object {idx.fqn})")


def read_dcp_tensors(folder, keep=None) -> dict:
    """Full (unsharded) tensors of a torch_dist folder, without torch.distributed: each tensor's
    chunks read weights-only and placed at their offsets. ``keep(name)`` filters by key.
    Call :func:`check_dcp_folder` first."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    folder = Path(folder)
    md = read_dcp_metadata(folder)
    out = {}
    for name, tmd in md.state_dict_metadata.items():
        if not isinstance(tmd, TensorStorageMetadata) or (keep is not None and not keep(name)):
            continue
        full = torch.empty(tuple(tmd.size), dtype=tmd.properties.dtype)
        for chunk in tmd.chunks:
            info = md.storage_data[MetadataIndex(name, chunk.offsets)]
            t = _weights_only_bytes(_dcp_read(folder, info), f"{folder / info.relative_path} (tensor {name})")
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(chunk.sizes):
                raise CheckpointCorruptError(
                    f"{folder / info.relative_path}: tensor {name} chunk has a wrong shape"
                )
            sl = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
            full[sl] = t
        out[name] = full
    return out


def read_dcp_objects(folder) -> dict:
    """The pickled objects (``ShardedObject``s) of a torch_dist folder, each read weights-only."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = Path(folder)
    md = read_dcp_metadata(folder)
    byte_keys = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    return {
        idx.fqn: _weights_only_bytes(
            _dcp_read(folder, info), f"{folder / info.relative_path} (object {idx.fqn})"
        )
        for idx, info in md.storage_data.items()
        if idx.fqn in byte_keys
    }
