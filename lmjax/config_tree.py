"""Frozen-dataclass trees from YAML: typed building, `a.b.c=value` overrides, dumping back.

The machinery under every lmjax config schema (`lmjax.config.Config`, the sweep's `SweepConfig`):
`build` checks keys (suggesting a close match), types and allowed values (`choices`) against the
dataclass annotations and converts YAML values (lists to tuples, ints to floats). Every error is a
`ConfigError` whose message names the key at fault and what was expected; the CLI prints it on
one line and exits non-zero.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from lmjax.errors import UserError


class ConfigError(UserError):
    """A configuration problem, reported to the user as one line."""


def choices(*values: str, default: str) -> Any:
    """A string field with its allowed values, checked by `build`."""
    return field(default=default, metadata={"choices": values})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; returns it converted (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"{key}: got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str) and tp == tuple[str, ...]:
                return (value,)  # a single path given on the command line
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is Any:
        # Frozen config: nested lists become tuples (hashable, and equal after a YAML round trip).
        return tuple(_coerce(v, Any, key) for v in value) if isinstance(value, list) else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # 1e6 written in YAML
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 3e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Builds dataclass `cls` from a nested dict, checking keys, types and choices."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; expected one of: {', '.join(fields)}"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in data.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
            kwargs[name] = build(tp, value, prefix=f"{key}.")
            continue
        value = _coerce(value, tp, key)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.steps=200` -> ("train.steps", 200); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {path}: invalid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def to_dict(cfg: Any) -> dict[str, Any]:
    def convert(x: Any) -> Any:
        if isinstance(x, tuple):
            return [convert(v) for v in x]
        if isinstance(x, dict):
            return {k: convert(v) for k, v in x.items()}
        return x

    return convert(dataclasses.asdict(cfg))


def flatten_dotted(tree: Any, where: str = "config", prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}, 'data.seq_len': 64} -> {'optim.lr': 1, 'data.seq_len': 64}."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {tree!r}")
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_dotted(value, where, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace(cfg: Any, **changes: Any) -> Any:
    """`replace(cfg, **{"train.steps": 10})`: a copy with dotted keys changed."""
    tree = to_dict(cfg)
    for key, value in changes.items():
        set_path(tree, key, value)
    return build(type(cfg), tree)
