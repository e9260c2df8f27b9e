"""One registry type for every extension point: backbones, threshold rules, retrieval methods, metrics.

An extension is one new file: a module in the extension point's package (imported by the package's `__init__`
through `import_submodules`, so dropping the file in is enough) or in a user's own package named in the
`RANPRM_PLUGINS` environment variable (see `ranprm.cli.config`). The module registers its object under a name:

    @BACKBONES.register("toy", config=ToyBackboneConfig)
    def build_toy(cfg: ToyBackboneConfig) -> nn.Module: ...

`config`, when given, is a dataclass of the entry's options with a `name` field defaulting to the entry's name.
Registries whose entries are chosen as a Hydra config group (`group="backbone"`) offer every such entry as an
option of that group, so `backbone=toy` works on the command line with no YAML file: `ranprm.cli.config` stores
the dataclass in Hydra's ConfigStore, which also checks the options' types when the config is composed.

Pure Python: no Hydra, no Lightning (the algorithm packages that hold registries must not import them).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from ranprm.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    config: type | None  # a dataclass of the entry's options (with `name`), or None when it takes none


class Registry(Generic[T]):
    """Named objects of one kind. `option` is the config key that chooses among them (for error messages);
    `group` the Hydra config group whose options they are, when they are chosen as a group."""

    def __init__(self, kind: str, option: str, group: str | None = None) -> None:
        self.kind, self.option, self.group = kind, option, group
        self._entries: dict[str, Entry[T]] = {}
        ALL_REGISTRIES.append(self)

    def register(self, name: str, *, config: type | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name`. A second registration of a name is a bug."""
        if config is not None:
            _check_config(self.kind, name, config)

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, config)
            return obj

        return decorator

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a toy entry clean up with this)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> Entry[T]:
        """The entry registered as `name`, else a ConfigError naming the option and the choices."""
        if name not in self._entries:
            raise ConfigError(f"{self.option}={name!r} is not a known {self.kind}; choose one of {self.names()}")
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)


ALL_REGISTRIES: list[Registry] = []


def _check_config(kind: str, name: str, config: type) -> None:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"{kind} {name!r}: config must be a dataclass, got {config!r}")
    fields = {f.name: f for f in dataclasses.fields(config)}
    if "name" not in fields or fields["name"].default != name:
        raise TypeError(f"{kind} {name!r}: its config dataclass needs a field `name: str = {name!r}`")


def import_submodules(package: str) -> None:
    """Import every module of `package` (not recursively), so each file's registrations run."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
