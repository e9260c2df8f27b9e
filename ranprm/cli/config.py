"""Where the Hydra configs live, and the thin CLI shell shared by every entry point.

The configs are the top-level `conf/` folder of the source tree. A wheel carries them inside the package as
`ranprm/conf` (see pyproject.toml), so the console scripts work from any folder after a plain `pip install .`.

Extensions: before any config is composed, `register_extensions()` imports the packages that hold registries
(`ranprm.utils.registry`) and the user's modules named in `RANPRM_PLUGINS` (comma-separated module names, e.g.
`RANPRM_PLUGINS=mylab.backbones`), then offers every registered entry that has a config dataclass as an option of
its Hydra group (unless a YAML file of that name exists there): a new backbone in one file is then
`backbone=<name>` on the command line.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ranprm.errors import ConfigError, RanprmError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the `ranprm` package folder
T = TypeVar("T")

# The packages whose import fills the registries (each imports its extension modules).
EXTENSION_PACKAGES: tuple[str, ...] = ("ranprm.models", "ranprm.prm", "ranprm.eval")
PLUGINS_VARIABLE = "RANPRM_PLUGINS"


def config_dir() -> Path:
    """The folder holding `train.yaml`: the installed copy inside the package, else the source tree's `conf/`."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise RanprmError(f"cannot find ranprm's configs next to {_PACKAGE_DIR}; reinstall ranprm")


def to_plain(cfg: Any) -> Any:
    """A resolved plain container (dict/list) of an OmegaConf node; anything else is returned as it is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg


def register_extensions() -> None:
    """Import the registries' packages and the `RANPRM_PLUGINS` modules; offer registered entries with a config
    dataclass as options of their Hydra group. Idempotent: call it before composing any config."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ranprm.utils.registry import ALL_REGISTRIES

    for package in EXTENSION_PACKAGES:
        importlib.import_module(package)
    for name in filter(None, (m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"{PLUGINS_VARIABLE}: cannot import {name!r} ({err}); put its folder on PYTHONPATH or fix the name"
            ) from err
    store = ConfigStore.instance()
    for registry in ALL_REGISTRIES:
        if registry.group is None:
            continue
        for entry in registry:
            if entry.config is not None and not (config_dir() / registry.group / f"{entry.name}.yaml").is_file():
                node = OmegaConf.structured(entry.config)
                OmegaConf.set_readonly(node, False)  # a frozen dataclass is read-only: overrides must still apply
                store.store(group=registry.group, name=entry.name, node=node)


def hydra_main(config_name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """`hydra.main` over ranprm's configs, with the extensions registered first (see the module docstring)."""
    import hydra

    report_user_errors(register_extensions)()  # a bad RANPRM_PLUGINS is one line and exit 2, too
    return hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose a config outside a Hydra main (tests, notebooks), e.g. `compose("train", ["backbone=tiny"])`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_extensions()

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Turn a `RanprmError` (or a required `???` value left unset) into one line on stderr and exit code 2, and a
    `RunInterrupted` into one line and its exit code (143 for SIGTERM); `HYDRA_FULL_ERROR=1` keeps the traceback."""
    from omegaconf.errors import MissingMandatoryValue

    from ranprm.errors import RunInterrupted

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except RunInterrupted as err:
            print(f"ranprm: interrupted: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except (RanprmError, MissingMandatoryValue) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if isinstance(err, MissingMandatoryValue):
                key = getattr(err, "full_key", None) or "a required value"
                err = ConfigError(f"{key} is required; give {key}=<value>")
            print(f"ranprm: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
