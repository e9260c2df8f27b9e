"""Config entries that name a class by `_target_` (`callbacks.extra.<name>`, `logger.extra.<name>`), as
lightning-hydra-template users write them: checked when the config is composed, instantiated by Hydra when the run
is built.

The check imports the target and binds the entry's keys to its signature, so a misspelt class path, an unknown or a
missing argument is one line naming the entry before anything runs (not a traceback once training has started).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from ranprm.errors import ConfigError

# Hydra's instantiate keywords: not arguments of the target
HYDRA_KEYS = frozenset({"_target_", "_args_", "_partial_", "_recursive_", "_convert_"})
EXAMPLE = "lightning.pytorch.callbacks.StochasticWeightAveraging"  # a class path the errors show, unless told


def check_target(spec: Any, option: str, base: type | None = None, example: str = EXAMPLE) -> type:
    """The class `spec["_target_"]` names, after checking that it imports, is a `base` (when given) and accepts the
    other keys of `spec` (its required arguments included); else a one-line `ConfigError` naming `option` (and
    `example`, a class path of the kind it takes)."""
    if not isinstance(spec, Mapping) or not spec.get("_target_"):
        raise ConfigError(f"{option} needs a _target_ naming its class, e.g. +{option}._target_={example}")
    target = str(spec["_target_"])
    found = _locate(target, option, example)
    if not inspect.isclass(found) or (base is not None and not issubclass(found, base)):
        kind = f"a {base.__module__}.{base.__qualname__}" if base is not None else "a class"
        raise ConfigError(f"{option}._target_={target} is not {kind}")
    arguments = {k: v for k, v in spec.items() if k not in HYDRA_KEYS}
    parameters = inspect.signature(found).parameters
    accepted = [name for name, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    unknown = [key for key in arguments if key not in accepted and not takes_any]
    if unknown:
        raise ConfigError(f"{option}.{unknown[0]} is not an argument of {target}; its arguments: {', '.join(accepted)}")
    try:
        inspect.signature(found).bind(*spec.get("_args_", []), **arguments)
    except TypeError as err:  # a required argument left out
        raise ConfigError(f"{option}: {target} {err}; give it as +{option}.<argument>=...") from None
    return found


def _locate(target: str, option: str, example: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name):
                raise ConfigError(f"{option}._target_={target}: importing {module_name} needs {err.name}, which is "
                                  "not installed") from None  # fmt: skip
            continue
        except Exception as err:  # noqa: BLE001 (the module's own error on import)
            raise ConfigError(f"{option}._target_={target}: importing {module_name} failed "
                              f"({type(err).__name__}: {err})") from None  # fmt: skip
        try:
            for attribute in parts[cut:]:
                found = getattr(found, attribute)
        except AttributeError:
            raise ConfigError(f"{option}._target_={target}: {module_name} has no {'.'.join(parts[cut:])}") from None
        return found
    raise ConfigError(f"{option}._target_={target} is not importable; give a full class path, e.g. {example}")


def check_targets(
    entries: Mapping[str, Any] | None, option: str, base: type | None = None, example: str = EXAMPLE
) -> None:
    """`check_target` for every entry of `entries` (`callbacks.extra`, `logger.extra`), named `<option>.<name>`."""
    for name, spec in (entries or {}).items():
        check_target(spec, f"{option}.{name}", base, example)


def instantiate_targets(
    entries: Mapping[str, Any] | None, option: str, base: type | None = None, example: str = EXAMPLE
) -> list[Any]:
    """The checked entries built by Hydra's `instantiate`, in the config's order. A class that fails to build (a
    package it needs is missing, a value it refuses) is one line naming the entry, as the checks are."""
    from hydra.utils import instantiate

    check_targets(entries, option, base, example)
    built = []
    for name, spec in (entries or {}).items():
        try:
            built.append(instantiate(dict(spec)))
        except Exception as err:  # noqa: BLE001 (whatever the user's class raises)
            cause = err.__cause__ or err  # Hydra wraps the class's own error
            first = (str(cause).strip().splitlines() or [""])[0]
            raise ConfigError(f"{option}.{name}: {spec['_target_']} could not be built "
                              f"({type(cause).__name__}: {first})") from err  # fmt: skip
    return built
