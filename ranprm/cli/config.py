"""Where the Hydra configs live, and the thin CLI shell shared by every entry point.

The configs are the top-level `conf/` folder of the source tree. A wheel carries them inside the package as
`ranprm/conf` (see pyproject.toml), so the console scripts work from any folder after a plain `pip install .`.

Extensions: before any config is composed, `register_extensions()` imports the packages that hold registries
(`ranprm.utils.registry`) and the user's modules named in `RANPRM_PLUGINS` (comma-separated module names, e.g.
`RANPRM_PLUGINS=mylab.backbones`), then offers every registered entry that has a config dataclass as an option of
its Hydra group (unless a YAML file of that name exists there): a new backbone in one file is then
`backbone=<name>` on the command line.

Every entry point's config is composed against its typed schema (`ranprm.cli.schema`); `hydra_main` and `compose`
turn a config that does not compose into one line (`config_error_line`), and `check_composed` names the required
values left unset.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import shutil
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from ranprm.errors import ConfigError, RanprmError
from ranprm.utils.checks import describe_type

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

    if isinstance(cfg, DictConfig | ListConfig):  # the schema's choices (enums) as their plain strings
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


def register_extensions() -> None:
    """Import the registries' packages and the `RANPRM_PLUGINS` modules; offer registered entries with a config
    dataclass as options of their Hydra group. Idempotent: call it before composing any config."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from ranprm.cli.help import register_help_resolver
    from ranprm.cli.run_dir import register_pid_resolver
    from ranprm.cli.schema import register_schemas
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
    register_schemas()
    register_help_resolver()
    register_pid_resolver()


def hydra_main(config_name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """`hydra.main` over ranprm's configs, with the extensions registered first (see the module docstring).

    A config that does not compose (a value of the wrong type, an unknown key or option, an override Hydra cannot
    parse) and a composed config with required values left `???` are one line on stderr and exit code 2, as any
    `RanprmError`: composition errors where Hydra reports them (`run_and_report`), the rest before the task starts
    (`check_composed`).
    """
    import hydra

    report_user_errors(register_extensions)()  # a bad RANPRM_PLUGINS is one line and exit 2, too

    def decorator(task: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(task)
        def checked(cfg: Any, *args: Any, **kwargs: Any) -> T:
            silence_third_party_noise()  # after Hydra configured logging for the job
            report_user_errors(_check_in_job)(cfg, config_name)
            return task(cfg, *args, **kwargs)

        hydra_task = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(checked)

        @functools.wraps(hydra_task)
        def run(*args: Any, **kwargs: Any) -> T:
            with _composition_errors_in_one_line():
                return hydra_task(*args, **kwargs)

        return run

    return decorator


def _check_in_job(cfg: Any, config_name: str) -> None:
    """`check_composed` inside a Hydra job: Hydra has already made the run folder, its staging `.hydra-pending-<pid>/`
    and the job log, so a refused config takes back what this attempt made (an empty log, then the folder if empty);
    nothing that was there before is touched."""
    from hydra.core.hydra_config import HydraConfig

    from ranprm.cli.run_dir import staging_dir

    try:
        check_composed(cfg, config_name)
    except RanprmError:
        hydra_cfg = HydraConfig.get()
        job_dir = Path(hydra_cfg.runtime.output_dir)
        if hydra_cfg.output_subdir:
            shutil.rmtree(staging_dir(job_dir), ignore_errors=True)
        log_file = job_dir / f"{hydra_cfg.job.name}.log"
        with suppress(OSError):
            if log_file.stat().st_size == 0:
                log_file.unlink()
        if job_dir.absolute() != Path.cwd():
            with suppress(OSError):
                job_dir.rmdir()  # only when empty: a folder that held anything stays
        raise


def _not_the_litlogger_tip(record: Any) -> bool:
    return "litlogger" not in record.getMessage()


def silence_third_party_noise() -> None:
    """Drop the lines every run printed that say nothing about it, by exact source and text (nothing else from those
    libraries is hidden): Lightning's advertisement for litlogger, and its `_pytree` deprecation warning about a
    torch API it calls itself (fixed by a later Lightning, not by a ranprm user)."""
    import logging
    import warnings

    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_the_litlogger_tip not in rank_zero.filters:
        rank_zero.addFilter(_not_the_litlogger_tip)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")  # fmt: skip


def compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose a config outside a Hydra main (tests, notebooks), e.g. `compose("train", ["backbone=tiny"])`.

    A config that does not compose raises a one-line `ConfigError` (`config_error_line`), as the entry points
    report it; required `???` values may stay unset here (a notebook fills them in later).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import CompactHydraException

    register_extensions()

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        try:
            cfg = hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)
        except CompactHydraException as err:
            raise ConfigError(config_error_line(err)) from err
    check_composed(cfg, config_name, require_all=False)
    return cfg


def check_composed(cfg: Any, config_name: str, require_all: bool = True) -> None:
    """What composition lets through: required `???` values left unset (all named in one line, with an example
    command), and keys added with `+` to a section that takes only its own keys (`+data.bogus=1`)."""
    from omegaconf import DictConfig, OmegaConf

    from ranprm.cli.help import ENTRY_POINTS, example
    from ranprm.cli.schema import OPEN_SECTIONS

    missing = sorted(OmegaConf.missing_keys(cfg)) if require_all else []
    if missing:
        named = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        hint = " ".join(f"{key}=..." for key in missing)
        suffix = f", e.g. `{example(config_name)}`" if config_name in ENTRY_POINTS else ""
        raise ConfigError(f"{named} {'is' if len(missing) == 1 else 'are'} required; give {hint}{suffix}")

    _check_loggers(cfg)
    _check_extra_callbacks(cfg)

    def visit(node: DictConfig, path: str) -> None:
        if path in OPEN_SECTIONS:  # any keyword of the library it configures
            return
        kind = OmegaConf.get_type(node)
        if kind is not None and dataclasses.is_dataclass(kind):
            known = [f.name for f in dataclasses.fields(kind)]
            for key in node:
                if key not in known and not (path == "" and key == "hydra"):
                    where = path or "the config"
                    raise ConfigError(f"{path + '.' if path else ''}{key} is not an option of {where}; "
                                      f"its options: {', '.join(known)}")  # fmt: skip
        for key in node:
            child = node._get_node(key)
            if path == "" and key == "hydra":  # Hydra's own node (return_hydra_config=True), typed by Hydra
                continue
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                visit(child, f"{path}.{key}" if path else str(key))

    visit(cfg, "")


def _check_extra_callbacks(cfg: Any) -> None:
    """`callbacks.extra.<name>._target_=...`: each target imports, is a Lightning callback and takes the given keys."""
    from omegaconf import DictConfig

    callbacks = cfg.get("callbacks") if isinstance(cfg, DictConfig) else None
    extra = callbacks.get("extra") if isinstance(callbacks, DictConfig) else None
    if not extra:
        return
    from lightning.pytorch.callbacks import Callback

    from ranprm.cli.targets import check_targets

    check_targets(to_plain(extra), "callbacks.extra", Callback)


def _check_loggers(cfg: Any) -> None:
    """`logger` is untyped (each logger's settings differ in shape): its keys are checked against the loggers' own,
    and each `logger.extra.<name>._target_` imports, is a Lightning logger and takes the given keys."""
    from omegaconf import DictConfig, OmegaConf

    logger = cfg.get("logger") if isinstance(cfg, DictConfig) else None
    if not isinstance(logger, DictConfig):
        return
    from lightning.pytorch.loggers import Logger

    from ranprm.cli.targets import check_targets
    from ranprm.lightning.loggers import EXTRA_LOGGER_EXAMPLE, EXTRA_LOGGERS, check_logger_config

    # unresolved: an extra logger's `save_dir: ${paths.output_dir}` has no value yet in a notebook's compose
    plain = OmegaConf.to_container(logger, resolve=False)
    check_logger_config(plain)
    check_targets(plain.get(EXTRA_LOGGERS), f"logger.{EXTRA_LOGGERS}", Logger, EXTRA_LOGGER_EXAMPLE)


@contextmanager
def _composition_errors_in_one_line() -> Iterator[None]:
    """Within, Hydra reports a config that does not compose as one line and exit 2 (`HYDRA_FULL_ERROR=1`: its
    traceback), for runs, sweeps, `--cfg` and `--help` alike; `--cfg job` (and `all`) also runs `check_composed`, the
    checks a run makes before its task starts. Hydra has no hook for this: its `run_and_report`, `Hydra.app_help` and
    `Hydra.show_cfg` are wrapped for the call and restored after."""
    from hydra._internal import hydra as hydra_app
    from hydra._internal import utils as hydra_utils
    from hydra.errors import CompactHydraException

    def one_line(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def reported(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except CompactHydraException as err:  # composition, override grammar, a missing config option
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"ranprm: error: {config_error_line(err)}", file=sys.stderr)
                raise SystemExit(2) from None

        return reported

    run_and_report = getattr(hydra_utils, "run_and_report", None)
    app_help = getattr(getattr(hydra_app, "Hydra", None), "app_help", None)
    if run_and_report is None or app_help is None:  # another Hydra layout: its own (multi-line) report stays
        yield
        return
    show_cfg = hydra_app.Hydra.show_cfg

    @functools.wraps(show_cfg)
    def checked_show_cfg(self: Any, config_name: str | None, overrides: list[str], cfg_type: str,
                         *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        if cfg_type in ("job", "all") and config_name is not None:  # `--cfg job` shows only a config a run accepts
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode
            from omegaconf import open_dict

            cfg = self.compose_config(config_name=config_name, overrides=overrides, run_mode=RunMode.RUN,
                                      with_log_configuration=False)  # fmt: skip
            HydraConfig.instance().set_config(cfg)
            with open_dict(cfg):
                del cfg["hydra"]
            report_user_errors(check_composed)(cfg, config_name)
        return show_cfg(self, config_name, overrides, cfg_type, *args, **kwargs)

    hydra_utils.run_and_report = lambda func: run_and_report(one_line(func))
    hydra_app.Hydra.app_help = one_line(app_help)
    hydra_app.Hydra.show_cfg = checked_show_cfg
    try:
        yield
    finally:
        hydra_utils.run_and_report = run_and_report
        hydra_app.Hydra.app_help = app_help
        hydra_app.Hydra.show_cfg = show_cfg


def config_error_line(err: BaseException) -> str:
    """One line for a config that does not compose: the key, the value and the type it must have
    (`optimizer.lr='abc' must be a number`), or the unknown key and the section's options."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OmegaConfBaseException):
        full_key = str(cause.full_key)
        key = full_key.rsplit(".", 1)[-1]
        hints = _field_types(getattr(cause, "object_type", None))
        if isinstance(cause, ValidationError) and key in hints:
            value = getattr(cause, "value", None)
            shown = repr(value) if value is not None else _quoted_value(str(cause.msg))
            return f"{full_key}={shown} must be {describe_type(hints[key])}"
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and hints:
            section = full_key.rsplit(".", 1)[0] if "." in full_key else "the config"
            return f"{full_key} is not an option of {section}; its options: {', '.join(hints)}"
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and full_key.startswith("logger."):
            line = _logger_key_line(full_key)  # `logger.project=x`: the untyped section's own message
            if line is not None:
                return line
        return f"{full_key}: {(str(cause.msg).splitlines() or [type(cause).__name__])[0]}"
    text = str(err)
    head, _, rest = text.partition("\n\nAvailable options in ")
    first = " ".join(head.split())
    if rest:  # Hydra: "Could not find 'backbone/x'\n\nAvailable options in 'backbone':\n\ta\n\tb\nConfig search ..."
        group, _, listing = rest.partition(":")
        options = [line.strip() for line in listing.split("Config search path")[0].splitlines() if line.strip()]
        return f"{first}; the options of {group}: {', '.join(options)}"
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return f"cannot read an override: {first}" if type(err).__name__ == "OverrideParseException" else first


def _logger_key_line(full_key: str) -> str | None:
    """What `check_logger_config` says of the key `full_key` (`logger.project`, `logger.wandb.projct`), if
    anything: the same line as for `+logger.project=x`."""
    from ranprm.lightning.loggers import LOGGER_KEYS, check_logger_config

    node: Any = None
    for part in reversed(full_key.split(".")[1:]):
        node = {part: node if node is not None else {}}
    try:
        check_logger_config(node)
    except ConfigError as err:
        return str(err)
    name = full_key.split(".")[1]
    if name in LOGGER_KEYS:  # a setting of a logger this run does not choose
        return (f"logger.{name}: logger={name} is not chosen in this run; add it (e.g. logger=[csv,{name}]), or "
                f"set its keys with +logger.{name}.<key>=...")  # fmt: skip
    return None


def _field_types(owner: Any) -> dict[str, Any]:
    if owner is None or not dataclasses.is_dataclass(owner):
        return {}
    try:
        return typing.get_type_hints(owner)
    except (NameError, TypeError):
        return {f.name: f.type for f in dataclasses.fields(owner)}


def _quoted_value(message: str) -> str:
    """The value OmegaConf quotes in its message ("Value 'abc' of type ...", "Invalid value 'x', ...")."""
    start = message.find("'")
    end = message.find("'", start + 1)
    return message[start : end + 1] if 0 <= start < end else "?"


def error_line(err: BaseException) -> str:
    """The message of a user error as one line. An error raised in a DataLoader worker (a corrupt JPEG) reaches the
    main process re-raised by torch with the worker's whole traceback in its message ("Caught DataError in
    DataLoader worker process 0. Original Traceback ..."): its own message is the text after the last
    `<ErrorType>: ` of that traceback."""
    text = str(err)
    if "\nOriginal Traceback" not in text:
        return text
    marker = f"{type(err).__name__}: "
    original = text[text.rfind(marker) + len(marker) :] if marker in text else text.splitlines()[-1]
    return " ".join(original.split())


def report_user_errors(task: Callable[..., T]) -> Callable[..., T]:
    """Turn a `RanprmError` (or a required `???` value left unset) into one line on stderr and exit code 2, and a
    `RunInterrupted` into one line and its exit code (143 for SIGTERM); `HYDRA_FULL_ERROR=1` keeps the traceback."""
    from omegaconf.errors import MissingMandatoryValue

    from ranprm.errors import RunInterrupted
    from ranprm.utils.stop import StopRequested

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return task(*args, **kwargs)
        except RunInterrupted as err:
            print(f"ranprm: interrupted: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None
        except StopRequested as err:  # before anything could be saved (a command with nothing to save)
            print(f"ranprm: interrupted: {err.signal_name}: stopped before finishing; run the same command again "
                  "(overwrite=true where it wrote results already)", file=sys.stderr)  # fmt: skip
            raise SystemExit(err.exit_code) from None
        except (RanprmError, MissingMandatoryValue) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            if isinstance(err, MissingMandatoryValue):
                key = getattr(err, "full_key", None) or "a required value"
                err = ConfigError(f"{key} is required; give {key}=<value>")
            print(f"ranprm: error: {error_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
