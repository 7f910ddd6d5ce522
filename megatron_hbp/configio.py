"""YAML <-> frozen dataclass mapping shared by every config in the project.

Rules (STYLE.md): YAML keys map one to one onto dataclass fields; an unknown key is an
error that names the file, the key and the fields that exist; nested dataclasses,
``list[Dataclass]``, ``tuple`` and ``Optional`` fields are converted recursively.
Validation of values belongs in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass. The message says what to change."""


# A number with an exponent, e.g. 5.7344e4 or 1e-5, that YAML 1.1 leaves a string.
_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
        value = float(value)  # YAML 1.1 (PyYAML) reads 5.7344e4 (no dot, no sign) as a string
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite value >= 0")
        if value < 0:
            raise ConfigError(f"{where}: {value!r} is negative; give a value >= 0")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError."""
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(hints)}. Valid keys for {cls.__name__}: {', '.join(fields)}"
        )
    hints_by_name = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints_by_name[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # a value check in __post_init__: say where the value came from
        raise ConfigError(f"{where}: {e}") from None


def check_overrides(cls: type, overrides: list[str]) -> None:
    """Check ``key.sub=value`` overrides (``--set``) against dataclass ``cls`` before they are
    merged into a config: an unknown key or a value of the wrong type is a ConfigError that names
    the ``--set`` flag (not the YAML file). Values are YAML; keys below a ``dict`` field are free."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov}: must look like key.sub=value")
        key, value = ov.split("=", 1)
        node: Any = cls
        parts = key.split(".")
        for i, part in enumerate(parts):
            node = _strip_optional(node)
            if not (dataclasses.is_dataclass(node) and isinstance(node, type)):
                if typing.get_origin(node) is dict or node is dict:
                    break
                raise ConfigError(f"--set {ov}: '{'.'.join(parts[:i])}' is a value, not a section")
            fields = {f.name: f for f in dataclasses.fields(node) if f.init}
            if part not in fields:
                close = difflib.get_close_matches(part, list(fields), n=1)
                hint = f" (did you mean '{'.'.join(parts[:i] + [close[0]])}'?)" if close else ""
                raise ConfigError(
                    f"--set {ov}: unknown key '{key}'{hint}; valid keys of {'.'.join(parts[:i]) or 'the config'}: "
                    + ", ".join(fields)
                )
            node = typing.get_type_hints(node)[part]
        else:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"--set {ov}: the value is not valid YAML ({e})".splitlines()[0]) from None
            if not (dataclasses.is_dataclass(_strip_optional(node)) and isinstance(parsed, dict)):
                _convert(node, parsed, f"--set {ov}")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (tuples become lists), suitable for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
    """Read ``path`` (optionally one top-level ``section`` of it) into dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: missing top-level section '{section}'")
        data = data[section]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return from_dict(cls, data, where=str(path) + (f":{section}" if section else ""))
