"""Strict loading of dataclass configs from YAML / dicts.

Every config in the project is a dataclass. `from_dict` builds one from plain data and refuses
anything it does not understand: an unknown key is an error naming the closest valid key, a value
of the wrong type is an error naming the key, its expected type and what was given. Defaults live
only in the dataclass definitions; nothing here invents a value.

    cfg = from_dict(GPT2Config, {"n_layer": 2, ...}, where="configs/model/tiny.yaml")
    cfg = load_yaml_config(GPT2Config, "configs/model/gpt_125m.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used. The message names the key and the fix."""


def closest_key(name: str, valid: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    """`where` names the file and the enclosing section, e.g. "pretrain.yaml: 'kernels'"."""
    valid = sorted(valid)
    hint = closest_key(key.rsplit(".", 1)[-1], valid)
    did_you_mean = f" Did you mean '{hint}'?" if hint else ""
    return ConfigError(f"{where}: unknown key '{key}'.{did_you_mean} Valid keys: {', '.join(valid)}.")


class StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the
    last value silently, so a second `optimizer:` block would replace the first one whole."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat; its keys are overridable
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # SafeLoader's own error names it below
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                name = key_node.start_mark.name  # the file's path, or "<unicode string>" for a --set value
                where = "" if name.startswith("<") else f"{name}: "
                raise ConfigError(f"{where}line {line}: key '{key}' appears twice in one mapping (first on line "
                                  f"{seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a key given twice or a non-mapping top level is a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: '{path}' (paths are relative to the repository root)")
    with open(path, encoding="utf-8") as f:
        data = yaml.load(f, Loader=StrictLoader)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, path: str) -> Any:
    """Check (and minimally coerce) `value` against the annotation `tp`; `path` is the dotted key."""
    at = f"{where}: key '{path}'"
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        real_options = [o for o in options if o is not type(None)]
        if len(real_options) == 1:  # Optional[X]: let X's own, more precise error through
            return _convert(value, real_options[0], where, path)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where, path)
            except ConfigError:
                pass
        raise ConfigError(f"{at}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = closest_key(str(value), [str(a) for a in allowed])
            did_you_mean = f" Did you mean '{hint}'?" if hint else ""
            raise ConfigError(f"{at}: {value!r} is not one of {list(allowed)}.{did_you_mean}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where, prefix=path + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{at}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: that many items
            if len(value) != len(args):
                raise ConfigError(f"{at}: expected a list of {len(args)} items ({', '.join(map(_type_name, args))}), "
                                  f"got {len(value)}: {list(value)!r}")
            return tuple(_convert(v, t, where, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, where, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        value_tp = args[1] if len(args) == 2 else Any
        return {k: _convert(v, value_tp, where, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads `1e-5` as a string (it wants `1.0e-5`); accept numeric strings and ints.
        if isinstance(value, bool):
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{at}: expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{at}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, strictly.

    `where` (a file name) prefixes error messages; `prefix` is the dotted path of this section.
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(prefix + str(key), fields, where)
        kwargs[key] = _convert(value, hints[key], where, prefix + key)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(prefix + m for m in missing)}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        section = f" (section '{prefix[:-1]}')" if prefix else ""
        raise ConfigError(f"{where}{section}: {e}") from e


def load_yaml_config(cls: type[T], path: str | os.PathLike) -> T:
    return from_dict(cls, read_yaml(path), where=os.fspath(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a dataclass config (for YAML/JSON dumps and checkpoints).

    Derived fields (`field(init=False)`) are left out, so `from_dict(type(cfg), to_dict(cfg))`
    round-trips.
    """
    out = {}
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML scalars) to a nested dict, in place.

    Only the syntax is checked here; `from_dict` later rejects keys the config does not have.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{k}' holds {child!r}, not a mapping")
            node = child
        node[keys[-1]] = yaml.load(raw, Loader=StrictLoader)
    return data
