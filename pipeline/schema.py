"""Typed YAML settings: a mapping read from a file, checked field by field against a dataclass.

The profile schema in pipeline/config.py is made of dataclasses; this module puts a YAML mapping
over one of them. Every value is checked against its field's type hint (an int where a float is
asked becomes a float; `int | None`, lists and nested dataclasses are followed), and a wrong type
or an unknown key is one `ProfileError` line naming the key, e.g. `pretrain.lr: expected a
number, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import KilnError


class ProfileError(KilnError):
    """A profile name, file or field that is not valid: the message names it."""


class _SettingsLoader(yaml.SafeLoader):
    """YAML 1.2's plain scalars: only true/false are booleans (so `compile: off` stays the string
    the setting expects) and `3e-4` is a number, not a string as in YAML 1.1."""


_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(path: Path) -> dict:
    """A YAML file's mapping (empty for an empty file), or a ProfileError naming the file."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SettingsLoader)
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of settings, got {_shown(data)}")
    return data


def apply_values(obj: Any, values: Any, where: str) -> Any:
    """A copy of the dataclass `obj` with the YAML mapping `values` over it: a section is
    overridden key by key, any other field is replaced by the value checked against its type."""
    changes = {}
    for key, value in _fields_of(type(obj), values, where).items():
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_values(current, value, _key(where, key))
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)


def _build(cls: type, values: Any, where: str) -> Any:
    """A new `cls` (a list item such as a corpus source) from the YAML mapping `values`."""
    checked = _fields_of(cls, values, where)
    try:
        return cls(**checked)
    except KilnError as exc:  # its own check: say which item
        raise ProfileError(f"{where}: {exc}") from None


def _fields_of(cls: type, values: Any, where: str) -> dict:
    """`values` checked against the fields of `cls`; sections (dataclass fields) are left for the caller."""
    if not isinstance(values, dict):
        raise ProfileError(f"{where or 'the file'}: expected a mapping, got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            raise ProfileError(f"{_key(where, key)}: unknown setting (known: {', '.join(names)})")
        hint = hints[key]
        is_section = isinstance(hint, type) and dataclasses.is_dataclass(hint)
        checked[key] = value if is_section else _typed(value, hint, _key(where, key))
    return checked


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the type `hint` asks for (an int where a float is asked becomes a float), or a
    ProfileError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, where)
            except ProfileError:
                pass
    elif origin is list and isinstance(value, list):
        return [_typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    elif hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif (
        hint is int
        and isinstance(value, int)
        and not isinstance(value, bool)
        or hint in (str, bool)
        and isinstance(value, hint)
    ):
        return value
    raise ProfileError(f"{where}: expected {_described(hint)}, got {_shown(value)}")


def _described(hint: Any) -> str:
    """A type as a profile's author reads it: `int | None` is 'an integer or null'."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_described(a) for a in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_described(args[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(hint, "a mapping")


def _shown(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)
