"""Typed, validated configuration machinery: dataclasses built from dicts, dotted overrides, masking, YAML.

Every section is a dataclass whose field defaults are the single source of truth. `build` turns a
plain dict (from YAML) into a section, checking every key and type; an error names the dotted key.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the file (if any), key and value."""


def fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}")


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming `key` unless `condition` holds."""
    if not condition:
        fail(key, message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [arg for arg in args if arg is not type(None)]
        if len(choices) == 1:  # Optional[X]: X's own error names what is wrong
            return _coerce(value, choices[0], key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        fail(key, f"{value!r} is not any of {' | '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            fail(key, f"{value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(key, f"expected a mapping for section {_type_name(tp)}, got {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(key, f"expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, f"expected a mapping, got {value!r}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        fail(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail(key, f"expected a string, got {value!r}")
    return value


def build(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys; then run its `validate()`."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        fail(f"{where}{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(names))})")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        fail(f"{prefix}.{required[0]}" if prefix else required[0], "missing key (it has no default)")
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{prefix}.{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of nested dict `data` with each dotted override set."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list tree (YAML-safe)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


SECRET_PATTERN = re.compile(r"(^key$|secret|password|passwd|token|credential|access_key|session_key|api_key)", re.I)
MASK = "***"


URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]+@")  # scheme://user:PASSWORD@host


def mask_value(key: str, value: Any) -> Any:
    """`value` with secrets hidden: all of it under a secret-looking key, a URL's password otherwise."""
    if value and SECRET_PATTERN.search(key.rsplit(".", 1)[-1]):
        return MASK
    if isinstance(value, str):
        return URL_PASSWORD.sub(rf"\1{MASK}@", value)
    return value


def mask_override(text: str) -> str:
    """A dotted `key=value` override with `mask_value` applied (for logs, params, job listings)."""
    key, sep, value = text.partition("=")
    return f"{key}={mask_value(key, value)}" if sep else text


def masked(obj: Any, key: str = "") -> Any:
    """Dataclass/dict tree -> plain tree with `mask_value` applied to every leaf."""
    tree = to_dict(obj)
    if isinstance(tree, dict):
        return {k: masked(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [masked(v, key) for v in tree]
    return mask_value(key, tree)


def drop_masked(tree: Any) -> Any:
    """Inverse side of `masked` when reading a stored config: masked leaves are removed (so the
    credentials come from the environment again) instead of being used as '***'."""
    if isinstance(tree, dict):
        return {k: drop_masked(v) for k, v in tree.items() if v != MASK}
    if isinstance(tree, list):
        return [drop_masked(v) for v in tree]
    return tree


def flatten(obj: Any, prefix: str = "", mask_secrets: bool = True) -> dict[str, Any]:
    """Dataclass/dict tree -> {"a.b.c": value}; secrets masked (see `mask_value`) unless told otherwise."""
    tree = to_dict(obj)
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[key] = mask_value(key, node) if mask_secrets else node

    walk(tree, prefix)
    return flat


def field_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} of a dataclass tree down to its dataclass fields (dict- and list-valued fields stay whole),
    as JSON values, secrets left out: what two configs are compared by (`changed_fields`)."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        key, value = f"{prefix}{field.name}", getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            values.update(field_values(value, f"{key}."))
            continue
        value = drop_masked(masked(value, key))
        if value != MASK:
            values[key] = json.loads(json.dumps(value, default=str))
    return values


def changed_fields(before: dict[str, Any], after: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """"key: old -> new" for every field of `after` (from `field_values`) that `before` has with another value.
    A field `before` lacks is unchanged when `after` holds its default: an option added since then, whose
    default keeps the old behaviour. Fields only `before` has (options since removed) are left out."""
    changed = []
    for key, value in after.items():
        if key not in before:
            if key not in defaults or defaults[key] != value:
                changed.append(f"{key}: not set -> {value!r}")
        elif before[key] != value:
            changed.append(f"{key}: {before[key]!r} -> {value!r}")
    return changed


def read_yaml_mapping(path: "str | Path", what: str = "config file") -> dict:
    """The top-level mapping of a YAML file; ConfigError naming the file when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def dump_yaml(obj: Any, mask_secrets: bool = False) -> str:
    """YAML of a config tree; with mask_secrets, as written into checkpoints, exports and MLflow."""
    return yaml.safe_dump(masked(obj) if mask_secrets else to_dict(obj), sort_keys=False)
