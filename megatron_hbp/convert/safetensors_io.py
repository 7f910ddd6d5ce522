"""Tensor-by-tensor safetensors I/O, so a 140 GB model converts with a few GB of RAM.

* :class:`StreamingSafetensorsWriter` writes one file whose tensor list (names, dtypes,
  shapes) is known up front: the header goes first, then each tensor's bytes as soon as
  it is produced, so only the tensor in hand is in memory (``safetensors.torch.save_file``
  needs the whole file's tensors at once).
* :class:`HFWeights` reads a Hugging Face directory (``model.safetensors``, or shards +
  ``model.safetensors.index.json``) lazily: shapes and dtypes from the headers, one tensor at
  a time, each read in its own short-lived ``safe_open`` so no mapping of a 10 GB shard
  stays resident.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors dtype codes (the format's spec) <-> torch dtypes.
_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_DTYPE = {v: k for k, v in _DTYPE_TO_ST.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def dtype_from_st(code: str) -> torch.dtype:
    if code not in _ST_TO_DTYPE:
        raise ValueError(f"safetensors dtype {code} is not supported by the converter")
    return _ST_TO_DTYPE[code]


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """Write ``path`` tensor by tensor; ``specs`` = ``[(name, dtype, shape), ...]`` in file order.

    Use as a context manager; :meth:`write` must be called once per spec, in order. On exit
    the file is checked to be complete (an exception inside the block removes the partial file).
    """

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.specs = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in specs]
        self.metadata = {"format": "pt", **(metadata or {})}
        self._next = 0
        self._f = None

    def __enter__(self) -> StreamingSafetensorsWriter:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape in self.specs:
            if name in header:
                raise ValueError(f"{self.path}: tensor {name} listed twice")
            size = nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected tensor {name} (all {len(self.specs)} written)")
        exp_name, exp_dtype, exp_shape = self.specs[self._next]
        if name != exp_name or tensor.dtype != exp_dtype or tuple(tensor.shape) != exp_shape:
            raise ValueError(
                f"{self.path}: expected tensor {exp_name} {exp_dtype} {list(exp_shape)}, got {name} "
                f"{tensor.dtype} {list(tensor.shape)}"
            )
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            # Raw little-endian bytes without an extra copy (bf16 has no NumPy dtype: view as bytes).
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is not None:
            self.path.unlink(missing_ok=True)
            return
        if self._next != len(self.specs):
            self.path.unlink(missing_ok=True)
            missing = [n for n, _, _ in self.specs[self._next :]]
            raise ValueError(f"{self.path}: {len(missing)} tensors never written, first {missing[:3]}")


def read_header(path: str | Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, from its header only."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from e
    return {
        k: (dtype_from_st(v["dtype"]), tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"
    }


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor, read through a mapping that is closed again before returning."""
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(name)
    return t


class HFWeights:
    """The weights of a HF directory: ``names``, ``spec(name) -> (dtype, shape)``, ``get(name)``.

    Accepts ``model.safetensors.index.json`` + shards, a single ``model.safetensors``, or
    (no index) every ``*.safetensors`` in the directory. Raises FileNotFoundError naming the
    index and the missing files when the index refers to shards that are absent.
    """

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory")
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} names {len(missing)} shard file(s) that do not exist in {self.dir}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Copy the complete "
                    "checkpoint (every model-XXXXX-of-YYYYY.safetensors)"
                )
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = (
                    f" (found {', '.join(bins[:3])}: PyTorch .bin checkpoints are not read; re-save "
                    "with save_pretrained(..., safe_serialization=True))"
                    if bins
                    else ""
                )
                raise FileNotFoundError(f"{self.dir}: no *.safetensors files{hint}")
            weight_map = None
        self._where: dict[str, Path] = {}
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for fname in files:
            for name, spec in read_header(self.dir / fname).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative
                if name in self._where:
                    raise ValueError(
                        f"{self.dir}: tensor {name} appears in {self._where[name].name} and {fname}"
                    )
                self._where[name] = self.dir / fname
                self._spec[name] = spec
        if weight_map is not None:
            lost = [n for n, f in weight_map.items() if n not in self._where]
            if lost:
                raise ValueError(
                    f"{index}: {len(lost)} tensor(s) are listed but absent from their shard, e.g. "
                    f"{lost[0]} in {weight_map[lost[0]]}"
                )

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._spec[name]

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def get(self, name: str) -> torch.Tensor:
        return read_tensor(self._where[name], name)
