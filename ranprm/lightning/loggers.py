"""Experiment loggers from the `logger` config group; W&B goes offline by itself and never stops training.

Several at once, as lightning-hydra-template users write it: each option of the group puts its settings under its
own key (`logger.wandb.project`, `logger.csv`), so `logger=[csv,tensorboard]` composes into one `logger` node that
holds both, and `build_loggers` builds every logger whose node says `enabled: true` (what the group's file sets:
settings alone, e.g. `logger.wandb.entity` in conf/local/default.yaml, turn no logger on). Loggers of any other
class are added by `_target_` under `logger.extra.<name>` (checked at compose time, `ranprm.cli.targets`).

W&B, the way its users expect it:
- one W&B run per job: the run is finished when the job's `Trainer.fit` ends (`SafeWandbLogger.finalize`), and a
  run left open in the same process (an earlier job of a local `-m` sweep that died before fitting) is finished
  before a new one starts, so no job logs into another job's run;
- `group` = the sweep (its folder, the same for every job of a local or SLURM multirun), `job_type` = the entry
  point (train | evaluate), the run name from the job's overrides (`backbone=ran,threshold=q3`), `tags` from the
  top-level `tags` key (`RunIdentity`);
- the run id is kept in `<run dir>/wandb_run_id`, so a run resumed in its folder (`ckpt_path=last`) continues the
  same W&B run (`resume="allow"`);
- `logger.wandb.log_model`: checkpoints as W&B artifacts (`false`, `true`: best and last at the end of training, `all`:
  every checkpoint as it is written);
- any W&B failure is one warning: building it falls back to CSV, a failed logging call is skipped.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf

from ranprm.errors import ConfigError
from ranprm.utils.checks import check_value

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"
# The keys each logger's conf/logger/<name>.yaml puts under `logger.<name>` (and build_loggers reads): any other is
# refused at compose time (`check_logger_config`), as an unknown key is everywhere else, instead of being ignored.
LOGGER_KEYS: dict[str, tuple[str, ...]] = {
    "wandb": ("enabled", "project", "entity", "run_name", "group", "job_type", "mode", "log_model"),
    "csv": ("enabled",),
    "tensorboard": ("enabled",),
}
EXTRA_LOGGERS = "extra"  # logger.extra.<name>: a logger of any class, by _target_
EXTRA_LOGGER_EXAMPLE = "lightning.pytorch.loggers.MLFlowLogger"  # what the one-line errors about them show
# Overrides that say where things are, not what the job does: left out of the run name.
_NAME_SKIPPED_KEYS = re.compile(
    r"^(hydra|paths|logger|callbacks\.progress_bar|data\.root|data\.num_workers|data\.cache_dir|ckpt_path|ckpt|"
    r"resume|tags|print_config|output|predictions|input|overwrite|device)(\.|$)"
)
_MAX_NAME = 128  # W&B refuses a run whose name is longer
_MAX_TAG = 64  # and one with a longer tag


@dataclass(frozen=True)
class RunIdentity:
    """What a W&B run is called and where it belongs: `job_type` (train | evaluate), a readable `name` (None: W&B
    picks one), the `group` it shares with the other jobs of its sweep (None outside a sweep), and its `tags`."""

    job_type: str = "train"
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()


def run_name(overrides: Sequence[str]) -> str | None:
    """A readable run name from a job's command-line overrides: `["backbone=ran", "threshold=q3"]` ->
    `backbone=ran,threshold=q3`.

    Overrides that only place files (paths, data.root, hydra.*, logger.*) are left out. Group choices and top-level
    keys (`threshold=q3`, `seed=1`: what sweeps usually vary) come first, dotted keys (`optimizer.lr=0.1`) after, each
    in command-line order, so that a name cut at W&B's 128 characters keeps them. None when nothing is left.
    """
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if not _NAME_SKIPPED_KEYS.match(key):
            kept.append(override.lstrip("+~"))
    kept.sort(key=lambda o: "." in o.split("=", 1)[0])  # stable: command-line order within each kind
    name = ",".join(kept)
    if not name:
        return None
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 3] + "..."


def sweep_group(sweep_dir: str | Path | None) -> str | None:
    """The W&B group of a multirun's jobs: its sweep folder (stable across the jobs, unique per sweep)."""
    if not sweep_dir:
        return None
    text = Path(sweep_dir).as_posix()
    return text if len(text) <= _MAX_NAME else "..." + text[-(_MAX_NAME - 3) :]


def run_identity(
    task_name: str,
    overrides: Sequence[str] = (),
    sweep_dir: str | Path | None = None,
    tags: Sequence[str] = (),
) -> RunIdentity:
    """The identity of one job: `sweep_dir` only for the jobs of a multirun."""
    return RunIdentity(
        job_type=task_name,
        name=run_name(overrides),
        group=sweep_group(sweep_dir),
        tags=tuple(str(t)[:_MAX_TAG] for t in tags),  # W&B refuses a run with a longer tag
    )


def wandb_has_credentials() -> bool:
    """True when an API key is configured (environment or the netrc entry `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def stored_run_id(run_dir: str | Path) -> str | None:
    """The W&B run id kept in `<run_dir>/wandb_run_id` by an earlier start of this run, if any."""
    path = Path(run_dir) / RUN_ID_FILE
    if not path.is_file():
        return None
    run_id = path.read_text().strip()
    return run_id or None


def _run_id_for(run_dir: Path) -> str | None:
    """The id this run folder's W&B run has (resume), or a new one written there (rank zero only: other ranks
    start no W&B run)."""
    if rank_zero_only.rank != 0:
        return None
    existing = stored_run_id(run_dir)
    if existing is not None:
        return existing
    import secrets
    import string

    from ranprm.utils.io import write_text_atomic

    # W&B's own id format (8 of [a-z0-9]); wandb's generator has moved between modules across releases.
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text_atomic(run_dir / RUN_ID_FILE, run_id + "\n")
    return run_id


def finish_open_wandb_run() -> None:
    """Finish a W&B run still open in this process, so that the next job's logger starts its own run.

    Lightning's `WandbLogger` reuses `wandb.run` when there is one; in a local multirun that made every job after
    the first log into the first job's run.
    """
    import sys

    wandb = sys.modules.get("wandb")  # not imported: no run can be open
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    log.info("finishing the W&B run %s left open in this process (one W&B run per job)", wandb.run.id)
    wandb.finish()


class SafeWandbLogger(WandbLogger):
    """A `WandbLogger` whose logging calls turn any exception into a warning: W&B never stops training.

    Each kind of call warns the first time it fails and logs at debug level after that, so a W&B outage does not
    flood the console with one warning per step. `finalize` (the end of `Trainer.fit`, or its failure) logs the
    checkpoints when `log_model` asks for it and finishes the W&B run: one run per job.
    """

    def _guard(self, name: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except Exception as err:  # network, service or media errors: the run goes on without W&B
            warned: set[str] = self.__dict__.setdefault("_failed_calls", set())
            level = logging.DEBUG if name in warned else logging.WARNING
            warned.add(name)
            log.log(level, "W&B %s failed (%s: %s); training goes on", name, type(err).__name__, err)
            return None

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._guard("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", super().log_hyperparams, params)

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("log_image", super().log_image, key, images, step, **kwargs)

    def log_table(self, *args: Any, **kwargs: Any) -> None:
        self._guard("log_table", super().log_table, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    def finalize(self, status: str) -> None:
        self._guard("finalize", super().finalize, status)  # logs the checkpoints (log_model=true) on success
        self._guard("finish", self._finish, status)

    def _finish(self, status: str) -> None:
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            # "finished": stopped by a signal (SLURM pre-emption) and checkpointed, to be resumed under this id.
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)

    def _scan_and_log_checkpoints(self, checkpoint_callback: Any) -> None:
        """Log the callback's new checkpoint files as versions of the artifact `model-<run id>`.

        Lightning's version calls every file the callback holds its `best`; ranprm's `last.ckpt` comes from an
        unmonitored callback of its own, so that rule would move the `best` alias onto the last epoch. Here a
        monitored callback's best file is `best`, an unmonitored callback's file is `latest`.
        """
        import wandb
        from lightning.pytorch.loggers.utilities import _scan_checkpoints

        monitored = checkpoint_callback.monitor is not None
        for mtime, path, score, _tag in _scan_checkpoints(checkpoint_callback, self._logged_model_time):
            is_best = monitored and path == checkpoint_callback.best_model_path
            aliases = ["best"] if is_best else [] if monitored else ["latest"]
            metadata = {
                "score": score.item() if hasattr(score, "item") else score,
                "original_filename": Path(path).name,
                "monitor": checkpoint_callback.monitor,
                "mode": getattr(checkpoint_callback, "mode", None),
            }
            if not self._checkpoint_name:
                self._checkpoint_name = f"model-{self.experiment.id}"
            artifact = wandb.Artifact(name=self._checkpoint_name, type="model", metadata=metadata)
            artifact.add_file(path, name="model.ckpt", policy=self.add_file_policy)
            self.experiment.log_artifact(artifact, aliases=aliases)
            self._logged_model_time[path] = mtime


class _HistoryKeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing `metrics.csv` when it starts; this one, in a resumed run, keeps
    the rows up to the step the run resumes from (rows after it were logged past the checkpoint and are logged
    again) and goes on appending, so the file holds the whole run's history."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._resume_step is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) <= self._resume_step]
        if len(kept) != len(rows):
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
        self.metrics_keys = keys  # a new key rewrites the file with the union header, the old rows kept


class HistoryKeepingCSVLogger(CSVLogger):
    """`CSVLogger` that continues `csv/metrics.csv` in a resumed run (`resume_step`: the checkpoint's global step)
    instead of replacing it with the resumed epochs only."""

    def __init__(self, save_dir: Path, resume_step: int | None = None) -> None:
        super().__init__(save_dir=str(save_dir), name="csv", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryKeepingWriter(self.log_dir, self._resume_step)
        return self._experiment


def _log_model_option(value: Any) -> bool | str:
    """`logger.wandb.log_model`: false | true (best and last checkpoints at the end of training) | all (every save)."""
    if isinstance(value, str) and value.lower() in ("true", "false", "all"):
        value = {"true": True, "false": False}.get(value.lower(), "all")
    if value is None:
        return False
    if value is True or value is False or value == "all":
        return value
    raise ConfigError(f"logger.wandb.log_model={value!r} is not valid; choose false, true (at the end of training) "
                      "or all")  # fmt: skip


def _wandb_logger(
    cfg: Mapping[str, Any], save_dir: Path, run_config: dict[str, Any] | None, identity: RunIdentity
) -> Logger:
    mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or ("online" if wandb_has_credentials() else "offline")
    if mode == "offline":
        log.info("W&B: no API key configured, logging offline to %s (upload later with `wandb sync`)", save_dir)
    if rank_zero_only.rank == 0:
        finish_open_wandb_run()
    save_dir.mkdir(parents=True, exist_ok=True)
    wandb_logger = SafeWandbLogger(
        project=cfg.get("project", "ranprm"),
        entity=cfg.get("entity"),
        name=cfg.get("run_name") or identity.name,
        group=cfg.get("group") or identity.group,
        job_type=cfg.get("job_type") or identity.job_type,
        tags=list(identity.tags),
        id=_run_id_for(save_dir),
        resume="allow",  # the id of this run folder: a resumed run continues its W&B run
        log_model=_log_model_option(cfg.get("log_model", False)),
        save_dir=str(save_dir),
        mode=mode,
        config=run_config,
    )
    _ = wandb_logger.experiment  # start the run now, inside the caller's try, not mid-training
    return wandb_logger


def enabled_loggers(cfg: Mapping[str, Any] | None) -> list[str]:
    """The built-in loggers `cfg` (the `logger` node) turns on, in its order: `logger=[wandb,csv]` -> wandb, csv."""
    return [
        name
        for name, node in (cfg or {}).items()
        if name in LOGGER_KEYS and isinstance(node, Mapping) and node.get("enabled") is True
    ]


def check_logger_config(cfg: Mapping[str, Any] | None) -> None:
    """A one-line ConfigError for a key under `logger` that no logger takes (checked at compose time): an unknown
    logger, a key its logger does not have, a non-boolean `enabled`, a bad `log_model`; and for TensorBoard chosen
    without its package. The entries of
    `logger.extra` are checked against their `_target_`'s signature by the caller (`ranprm.cli.config`)."""
    for name, node in (cfg or {}).items():
        if name == EXTRA_LOGGERS:
            continue
        if name not in LOGGER_KEYS:
            owners = [logger for logger, keys in LOGGER_KEYS.items() if name in keys and name != "enabled"]
            if owners:  # the spelling of one logger per run: its settings were directly under `logger`
                raise ConfigError(f"logger.{name} is not an option of logger; each logger's settings are under its "
                                  f"name: logger.{owners[0]}.{name}=...")  # fmt: skip
            raise ConfigError(f"logger.{name} is not an option of logger; its options: {', '.join(LOGGER_KEYS)} "
                              f"(logger=[csv,tensorboard] picks several) and {EXTRA_LOGGERS} "
                              f"(+logger.{EXTRA_LOGGERS}.<name>._target_={EXTRA_LOGGER_EXAMPLE})")  # fmt: skip
        if node is None:
            continue  # `logger.wandb=null`: that logger off
        if not isinstance(node, Mapping):
            raise ConfigError(f"logger.{name}={node!r} must be the mapping of its options (or null: off)")
        for key in node:
            if key not in LOGGER_KEYS[name]:
                raise ConfigError(f"logger.{name}.{key} is not an option of logger={name}; its options: "
                                  f"{', '.join(LOGGER_KEYS[name])}")  # fmt: skip
        if "enabled" in node:
            check_value(node["enabled"], bool, f"logger.{name}.enabled")
        if name == "wandb":
            _log_model_option(node.get("log_model", False))
    if "tensorboard" in enabled_loggers(cfg):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'ranprm[tensorboard]'")


def build_loggers(
    cfg: Mapping[str, Any] | None,
    save_dir: Path,
    run_config: dict[str, Any] | None = None,
    identity: RunIdentity | None = None,
    resume_step: int | None = None,
) -> list[Logger]:
    """Every configured logger, in the config's order, then the `logger.extra` ones; [] for `logger=none`.

    When W&B cannot start: a warning, and a CSV logger instead (unless CSV is configured too), never a dead run.
    `resume_step`: the global step a resumed run starts from. The CSV logger then keeps the earlier rows up to it;
    TensorBoard adds an event file in the same folder and W&B continues the same run (its id is kept in the run
    folder), both at the steps that follow."""
    check_logger_config(cfg)
    save_dir = Path(save_dir)
    names = enabled_loggers(cfg)
    loggers: list[Logger] = []
    for name in names:
        if name == "csv":
            loggers.append(HistoryKeepingCSVLogger(save_dir, resume_step))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(save_dir=str(save_dir), name="tensorboard", version=""))
        elif name == "wandb":
            try:
                loggers.append(_wandb_logger(cfg["wandb"], save_dir, run_config, identity or RunIdentity()))
            except Exception as err:  # any W&B failure (network, auth, service) must not cost the run
                also = "the CSV logger only" if "csv" in names else f"CSV in {save_dir} instead"
                log.warning("W&B could not start (%s: %s); logging to %s", type(err).__name__, err, also)
                if "csv" not in names:
                    loggers.append(HistoryKeepingCSVLogger(save_dir, resume_step))
    extra = (cfg or {}).get(EXTRA_LOGGERS)
    if extra:
        from ranprm.cli.targets import instantiate_targets  # a leaf module: the checks compose-time runs too

        loggers += instantiate_targets(extra, f"logger.{EXTRA_LOGGERS}", Logger, EXTRA_LOGGER_EXAMPLE)
    return loggers


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}/{key}": float(value)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def log_evaluation(
    cfg: Mapping[str, Any] | None,
    save_dir: str | Path,
    metrics: Mapping[str, Any],
    run_config: Mapping[str, Any] | DictConfig | None = None,
    identity: RunIdentity | None = None,
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None = None,
) -> list[Logger]:
    """Log an evaluation's results with every configured logger (`ranprm-evaluate logger=wandb`); returns them.

    Every numeric entry of `metrics` becomes `eval/<key>` (in W&B also the run summary); `metrics["per_class"]`
    (class name -> {column: value}) becomes the W&B table `eval/per_class`, and each of `tables` (name ->
    (columns, rows), e.g. the ranked variants) the W&B table `eval/<name>`. Each run is finished before returning.
    Any logging failure is a warning (that logger's, the others still log): the evaluation's files are written.
    """
    identity = identity or RunIdentity(job_type="evaluate")
    try:
        if isinstance(run_config, DictConfig):
            run_config = OmegaConf.to_container(run_config, resolve=True)  # type: ignore[assignment]
        loggers = build_loggers(cfg, Path(save_dir), run_config=run_config, identity=identity)
    except ConfigError:
        raise
    except Exception as err:  # the metrics are on disk already: a logger problem must not turn into a failed run
        log.warning("could not log the evaluation (%s: %s); the results are in %s", type(err).__name__, err, save_dir)
        return []
    logged = []
    for logger in loggers:
        try:
            _log_evaluation_to(logger, metrics, tables)
            logged.append(logger)
        except Exception as err:  # noqa: BLE001 (as above, for this logger alone)
            log.warning("could not log the evaluation to %s (%s: %s); the results are in %s", type(logger).__name__,
                        type(err).__name__, err, save_dir)  # fmt: skip
    return logged


def _log_evaluation_to(
    logger: Logger,
    metrics: Mapping[str, Any],
    tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence[Any]]]] | None,
) -> None:
    logger.log_metrics(_scalars(metrics, "eval"), step=0)
    if isinstance(logger, WandbLogger):
        per_class = metrics.get("per_class")
        if isinstance(per_class, Mapping) and per_class:
            columns = ["class", *dict.fromkeys(k for row in per_class.values() for k in row)]
            rows = [[name, *(row.get(c) for c in columns[1:])] for name, row in per_class.items()]
            logger.log_table(key="eval/per_class", columns=columns, data=rows, step=0)
        for name, (columns, rows) in (tables or {}).items():
            logger.log_table(key=f"eval/{name}", columns=list(columns), data=[list(r) for r in rows], step=0)
    logger.save()
    logger.finalize("success")
