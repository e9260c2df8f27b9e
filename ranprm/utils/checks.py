"""Type and range checks for the plain config dataclasses (`DataConfig`, ...): a bad value is one line that names
the option, raised where the run is built and before any data is read (Hydra's structured configs may check the
same at compose time; these checks also cover code that builds the dataclasses directly)."""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from typing import Any

from ranprm.errors import ConfigError

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "a map"}


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    if origin is tuple:
        items = typing.get_args(kind)
        return (
            isinstance(value, list | tuple)
            and len(value) == len(items)
            and all(_matches(v, k) for v, k in zip(value, items, strict=True))
        )
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


def describe_type(kind: Any) -> str:
    """How an error message names the values of a type: "an integer", "a number or null", "one of a, b"."""
    return _describe(kind)


def _describe(kind: Any) -> str:
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(k) for k in typing.get_args(kind) if k is not type(None)]
        nullable = type(None) in typing.get_args(kind)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple and typing.get_args(kind)[-1:] == (Ellipsis,):
        return f"a list of {_describe(typing.get_args(kind)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return (
            f"a list of {len(typing.get_args(kind))} values ({', '.join(_describe(k) for k in typing.get_args(kind))})"
        )
    return _NAMES.get(origin or kind, getattr(kind, "__name__", str(kind)))


def check_value(value: Any, kind: Any, option: str) -> Any:
    """`value` if it is of type `kind` (ints pass as floats; bools never pass as numbers), else a ConfigError."""
    if isinstance(value, str) and value == "???":
        raise ConfigError(f"{option} is required; give {option}=<value>")
    if not _matches(value, kind):
        raise ConfigError(f"{option}={value!r} must be {_describe(kind)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{option}={value!r} must be a finite number")
    return value


def check_dataclass_types(instance: Any, prefix: str) -> None:
    """Check every field of the dataclass `instance` against its annotation; errors name `<prefix>.<field>`."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        check_value(getattr(instance, field.name), hints[field.name], f"{prefix}.{field.name}")


def check_mapping_for(cls: type, values: dict[str, Any], prefix: str) -> None:
    """Check `values` (keyword arguments for the dataclass `cls`) before `cls(**values)`: unknown keys and values of
    the wrong type are one line naming `<prefix>.<key>`, not a TypeError from the constructor."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key} is not an option; known options: {', '.join(known)}")
        check_value(value, hints[key], f"{prefix}.{key}")


def check_range(
    value: float | int | None,
    option: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A ConfigError naming `option` unless `value` (None passes) lies within the bounds (closed unless `*_open`)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{option}={value!r} must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{option}={value} must lie in {span}")
