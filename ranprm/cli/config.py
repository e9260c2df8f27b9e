"""Where the Hydra configs live, and the thin CLI shell shared by every entry point.

The configs are the top-level `conf/` folder of the source tree. A wheel carries them inside the package as
`ranprm/conf` (see pyproject.toml), so the console scripts work from any folder after a plain `pip install .`.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ranprm.errors import RanprmError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the `ranprm` package folder
T = TypeVar("T")


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


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose a config outside a Hydra main (tests, notebooks), e.g. `compose("train", ["backbone=tiny"])`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Turn a `RanprmError` into one line on stderr and exit code 2; `HYDRA_FULL_ERROR=1` keeps the traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except RanprmError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"ranprm: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
