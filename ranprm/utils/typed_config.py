"""Typed config dataclasses from plain mappings: one parser for every registered option set.

An extension point's options are a dataclass (see `ranprm.utils.registry`). `from_mapping(cls, mapping, prefix)`
builds it from what a YAML file, the command line or a checkpoint holds: strings such as "true" or "0.5" are
converted to the field's type, nested dataclasses are built recursively, unknown keys and values that do not fit
raise a `ConfigError` that names the option (`prefix.key`) and says what it must be. Validation of the values
themselves (ranges, odd sizes, ...) belongs to each dataclass's `__post_init__`.

Supported field types: bool, int, float, str, `X | None` of those, and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ranprm.errors import ConfigError

T = TypeVar("T")


def _convert(option: str, kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if len(args) != len(typing.get_args(kind)):
                return None
            raise ConfigError(f"{option} must not be null")
        return _convert(option, args[0], value)
    if value is None:
        raise ConfigError(f"{option} must not be null")
    if dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{option}={value!r} must be a mapping of {kind.__name__} options")
        return from_mapping(kind, value, option)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{option}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{option}={value!r} must be an integer")
        try:
            return int(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{option}={value!r} must be an integer") from err
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{option}={value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{option}={value!r} must be a number") from err
        if math.isnan(number):
            raise ConfigError(f"{option}={value!r} must be a number, not NaN")
        return number
    if kind is str:
        if isinstance(value, Mapping | list | tuple):
            raise ConfigError(f"{option}={value!r} must be a string")
        return str(value)
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, prefix: str) -> T:
    """An instance of the dataclass `cls` from `mapping` (missing keys take their defaults).

    `prefix` is the config path of the mapping (e.g. "retrieval"), used in error messages.
    """
    values = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if unknown:
        name = values.get("name", getattr(cls, "name", cls.__name__))
        raise ConfigError(f"{prefix} ({name}): unknown option(s) {unknown}; known: {sorted(known)}")
    kwargs = {key: _convert(f"{prefix}.{key}", hints[key], value) for key, value in values.items()}
    return cls(**kwargs)


def to_mapping(obj: Any) -> dict[str, Any]:
    """The plain mapping of a config dataclass (nested ones included): what `from_mapping` reads back."""
    return dataclasses.asdict(obj)
