"""YAML configs validated into typed dataclasses.

Unknown or misspelled keys and values of the wrong type raise :class:`ConfigError` naming the key,
the expected type and, for misspellings, the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError, suggest

T = TypeVar("T")

_NONE = type(None)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is _NONE:
        return "null"
    return getattr(tp, "__name__", str(tp))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (with the few safe coercions YAML needs)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and _NONE in args:
            return None
        non_none = [a for a in args if a is not _NONE]
        if len(non_none) == 1:      # Optional[X]: X's own, more specific message
            return _coerce(value, non_none[0], where)
        errors = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(
            f"{where}: {value!r} is not one of {', '.join(repr(a) for a in get_args(tp))}."
            + suggest(str(value), [str(a) for a in get_args(tp)]))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__}).")
        args = get_args(tp)
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r} ({type(value).__name__}).")
        args = get_args(tp)
        if not args:
            return dict(value)
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r} ({type(value).__name__}).")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__}).")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _is_number(value):
            return float(value)  # YAML 1.1 reads '1e-3' as a string
        raise ConfigError(f"{where}: expected a number, got {value!r} ({type(value).__name__}).")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__}).")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r} ({type(data).__name__}).")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {k!r}." + suggest(str(k), fields)
            + f" Valid keys: {', '.join(sorted(fields))}.")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}.")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        if inspect.signature(validate).parameters:
            validate(where)        # validators that name where they sit (e.g. "adapt config.target")
        else:
            validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def config_hash(obj: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-able settings tree (dataclasses through :func:`to_dict` first): the key of
    cached models, resume fingerprints and reused stages. Key order does not matter; unknown types hash as
    their ``str``."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


# PyYAML raises plain ValueError/AttributeError/... (not YAMLError) for some malformed scalars,
# e.g. the date '2020-13-45' or '!!int 0x'; a very deep document can hit the recursion limit.
_YAML_FAILURES = (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError)


def _yaml_problem(e: BaseException) -> str:
    if isinstance(e, yaml.YAMLError):
        return str(e)
    if isinstance(e, RecursionError):
        return "it is nested too deeply"
    return f"a value cannot be read ({type(e).__name__}: {e})"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing file or a non-mapping document raises ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; pass the path of a YAML file "
                          f"(see the examples under configs/ or benchmarks/).")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not a UTF-8 text file ({e.reason} at byte {e.start}); "
                          f"pass a YAML file.") from None
    try:
        data = yaml.safe_load(text)
    except _YAML_FAILURES as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=1"`` -> (["a", "b"], 1); the value is read as YAML."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=0.01).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write it as key=value (e.g. train.lr=0.01).")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except _YAML_FAILURES:
        value = raw  # not YAML: keep the text (validation then says whether a string fits there)
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``--set key.sub=value`` overrides to a raw config mapping (validated later)."""
    out = dict(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section (it holds {child!r}).")
            else:
                child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return out
