"""Run and output folders: nothing a user made is replaced without `overwrite=true`, and a refused or failed attempt
leaves the folder as it was.

- `plan_training_folder` / `apply_folder_plan`: a run folder that holds results of an earlier run (metrics,
  checkpoints, panels, failure or interruption records) is refused unless the run resumes from its own checkpoint
  (`ckpt_path=last`, `resume=<dir>`, or a SLURM requeue) or `overwrite=true` is given, which removes them first.
  `ckpt_path=last` with no checkpoint in the folder is an error, not a silent fresh start. A sweep run again into
  its own sweep folder (`hydra.sweep.dir=<dir>`) continues: a job with the same overrides that finished is skipped,
  an interrupted one resumes from its checkpoint, the others run.
- `.hydra/` files: Hydra writes `config.yaml`, `hydra.yaml` and `overrides.yaml` *before* the task runs, so a
  refused attempt would already have replaced the earlier run's record. ranprm's Hydra config therefore sets
  `hydra.output_subdir` to the staging folder `.hydra-pending/`; the task moves the files into `.hydra/` once the
  folder checks pass (`commit_hydra_files`; on a resume the saved overrides are updated, not replaced), and
  `hydra_files_guard` drops them after a refused or failed attempt in a folder that already had a `.hydra/`.
- `check_output_files`: an output file that exists is refused without `overwrite=true` (evaluate's metrics.json).
- `hold_folder`: one process at a time per run or output folder. An OS lock (`flock` on `.ranprm.lock` in the folder)
  is held for the command's life; a second train, evaluate or predict into the same folder refuses at once, naming
  the holder's pid, before it reads or writes anything there. The kernel drops the lock however the holder dies
  (SIGKILL included), so a stale lock file never blocks a later run.
- Hydra's staging folder is per process (`.hydra-pending-<pid>`, see `register_pid_resolver`), so a second process
  starting in a folder cannot replace the first one's record before the first one commits it.
- `RunFolderCheck` (a Hydra callback, conf/hydra/default.yaml): the run or sweep folder Hydra is about to make, and
  `$RANPRM_LOG_DIR` above it, checked first, so a file in the way or a read-only mount is one line naming the
  variable or option and the path, not Hydra's traceback from its `mkdir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ranprm.errors import FolderBusyError, RanprmError, RunFolderError
from ranprm.utils.io import check_writable, clean_stale_temp_files, is_stale_temp_file, write_text_atomic

log = logging.getLogger(__name__)

HYDRA_DIR = ".hydra"
STAGING_PREFIX = ".hydra-pending"  # conf/hydra/default.yaml: hydra.output_subdir = .hydra-pending-${ranprm_pid:}
LOCK_FILE = ".ranprm.lock"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# What `ranprm-train` leaves in its run folder (the logger's own folders are left to the logger: a CSV logger
# replaces its file, W&B and TensorBoard add a new run next to the old one).
RESULT_FILES = ("metrics.json", "failed.json", "interrupted.json")
RESULT_DIRS = (CHECKPOINT_DIR, "panels")
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"  # Lightning's SLURM auto-requeue checkpoints, in the run folder
# The files ranprm writes inside RESULT_DIRS (cli/build.py's checkpoint names, lightning/panels.py's panels):
# `overwrite=true` removes these and never anything else there (a user's own .ckpt in checkpoints/ is kept).
OWN_FILES = {CHECKPOINT_DIR: ("last.ckpt", "last-v*.ckpt", "best-epoch*.ckpt"), "panels": ("epoch_*/*.png",)}
LOG_DIR_VARIABLE = "RANPRM_LOG_DIR"  # conf/paths/default.yaml: paths.log_dir, where run and sweep folders go
# Overrides that say how this attempt runs, not what the run is: never carried into a resumed run's saved overrides.
ATTEMPT_KEYS = ("ckpt_path", "resume", "overwrite")


def _has_entries(folder: Path) -> bool:
    return folder.is_dir() and any(not is_stale_temp_file(p) for p in folder.iterdir())


def existing_results(run_dir: Path) -> list[Path]:
    """The results of an earlier run in `run_dir` (a stale temp file of a killed write is not a result)."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RESULT_FILES if (run_dir / name).is_file()]
    found += [run_dir / name for name in RESULT_DIRS if _has_entries(run_dir / name)]
    return found + sorted(run_dir.glob(HPC_CHECKPOINTS))


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoints/last.ckpt` and Lightning's `hpc_ckpt_N.ckpt`, newest first."""
    candidates = [Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT, *Path(run_dir).glob(HPC_CHECKPOINTS)]
    return sorted((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (Lightning's auto-requeue, `scontrol requeue`, `--requeue`)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def _names(paths: list[Path], run_dir: Path) -> str:
    shown = ", ".join(str(p.relative_to(run_dir)) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


@dataclass(frozen=True)
class FolderPlan:
    """What a training run will do with its folder: resume from `resume`, and first delete `remove`."""

    run_dir: Path
    resume: Path | None
    remove: tuple[Path, ...] = ()
    finished: bool = False  # a continued sweep's job that already finished: nothing to do


def plan_training_folder(
    run_dir: Path,
    ckpt_path: str | None,
    overwrite: bool,
    folder_option: str = "hydra.run.dir",
    continue_job: bool = False,
) -> FolderPlan:
    """Decide, without touching anything, how a training run may use `run_dir` (see the module docstring).

    `ckpt_path=last` resolves to the folder's newest checkpoint; under a SLURM requeue with no `ckpt_path` the run
    resumes from it too (Lightning's auto-requeue restarts the same command). A folder holding another run's
    results is refused unless `overwrite=true`, in which case the plan removes them. `folder_option` names the
    setting that chose the folder (`hydra.sweep.dir` in a multirun), for the message.
    """
    run_dir = Path(run_dir)
    results = existing_results(run_dir)
    resume: Path | None = None
    if ckpt_path == "last":
        found = resumable_checkpoints(run_dir)
        if not found:
            raise RunFolderError(
                f"ckpt_path=last: {run_dir / CHECKPOINT_DIR} holds no {LAST_CHECKPOINT} to resume from; give the "
                "interrupted run's folder (`ranprm-train resume=<run dir>`, or hydra.run.dir=<run dir>)"
            )
        resume = found[0]
    elif ckpt_path is not None:
        resume = Path(str(ckpt_path)).expanduser().absolute()
    elif slurm_requeued() and (found := resumable_checkpoints(run_dir)):
        resume = found[0]
        log.info("SLURM requeue (SLURM_RESTART_COUNT=%s): resuming from %s", os.environ["SLURM_RESTART_COUNT"], resume)
    elif continue_job and not overwrite and results:  # the same job of a sweep run again into its sweep folder
        if (run_dir / "metrics.json").is_file() and not (run_dir / "interrupted.json").is_file():
            log.info("%s: this sweep job finished earlier; skipped (overwrite=true runs it again)", run_dir)
            return FolderPlan(run_dir, None, finished=True)
        if found := resumable_checkpoints(run_dir):
            resume = found[0]
            log.info("%s: continuing this sweep job from %s", run_dir, resume)
    resuming_here = resume is not None and run_dir.resolve() in resume.resolve().parents
    if not results or resuming_here:
        return FolderPlan(run_dir, resume)
    if not overwrite:
        how = (
            f"resume it with `ranprm-train resume={run_dir}`, "
            if resume is None and resumable_checkpoints(run_dir)
            else ""
        )
        raise RunFolderError(
            f"run folder {run_dir} already holds {_names(results, run_dir)} of an earlier run; {how}pass "
            f"overwrite=true to replace them, or choose another {folder_option}"
        )
    remove = [p for p in results if p.is_file()]
    for name, patterns in OWN_FILES.items():
        remove += sorted({f for pattern in patterns for f in (run_dir / name).glob(pattern) if f.is_file()})
    return FolderPlan(run_dir, resume, tuple(remove))


def foreign_files(run_dir: Path) -> list[Path]:
    """Files in the run's result folders that ranprm did not write (not in OWN_FILES, not a stale temp file)."""
    run_dir = Path(run_dir)
    found = []
    for name, patterns in OWN_FILES.items():
        own = {f for pattern in patterns for f in (run_dir / name).glob(pattern)}
        found += [f for f in sorted((run_dir / name).rglob("*")) if f.is_file() and f not in own
                  and not is_stale_temp_file(f)]  # fmt: skip
    return found


def apply_folder_plan(plan: FolderPlan) -> None:
    """Remove the stale temp files of killed writes and, with `overwrite=true`, the files the earlier run wrote;
    a user's own files in its folders are kept (and named)."""
    clean_stale_temp_files(plan.run_dir, plan.run_dir / CHECKPOINT_DIR)
    for path in plan.remove:
        path.unlink(missing_ok=True)
    for name in RESULT_DIRS:  # the folders ranprm's files leave empty, deepest first
        inside = sorted((plan.run_dir / name).rglob("*"), key=lambda p: len(p.parts), reverse=True)
        for folder in [*inside, plan.run_dir / name]:
            with contextlib.suppress(OSError):
                folder.rmdir()
    if plan.remove:
        log.warning("overwrite=true: removed %s of an earlier run in %s", _names(list(plan.remove), plan.run_dir),
                    plan.run_dir)  # fmt: skip
        kept = foreign_files(plan.run_dir)
        if kept:
            log.warning("overwrite=true: kept %s, not written by ranprm", _names(kept, plan.run_dir))


def check_output_files(paths: list[Path], overwrite: bool, option: str) -> None:
    """Refuse to replace existing files without `overwrite=true` (`option` names the setting that chose them)."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        what = (
            f"{existing[0]} and {len(existing) - 1} more already exist"
            if len(existing) > 1
            else (f"{existing[0]} already exists")
        )
        raise RunFolderError(f"{option}: {what}; choose another folder or pass overwrite=true to replace them")


# --- Hydra's .hydra files -----------------------------------------------------------------------------------------


def override_key(override: str) -> str:
    """The config key an override sets: `+a.b=1` -> `a.b`, `~a` -> `a`, `a=b` -> `a`."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """`saved` updated by `new` (same key: replaced in place, once; a new key: appended), without the attempt keys."""
    merged = [o for o in saved if override_key(o) not in ATTEMPT_KEYS]
    for override in new:
        key = override_key(override)
        if key in ATTEMPT_KEYS:
            continue
        at = [i for i, o in enumerate(merged) if override_key(o) == key]
        if not at:
            merged.append(override)
            continue
        merged[at[0]] = override
        for i in reversed(at[1:]):  # a key given twice on the first command line (Hydra keeps the last)
            del merged[i]
    return merged


def commit_hydra_files(run_dir: Path, resumed: bool = False) -> None:
    """Move this attempt's `.hydra-pending/*.yaml` into `.hydra/` (a no-op outside a Hydra job).

    On a resume the run's saved `overrides.yaml` is updated with this attempt's overrides (`merge_overrides`), so
    `resume=<run dir>` keeps working after a second interruption and the record still says how the run was made.
    """
    run_dir = Path(run_dir)
    pending, target = staging_dir(run_dir), run_dir / HYDRA_DIR
    for other in run_dir.glob(f"{STAGING_PREFIX}*"):  # a killed attempt's leftovers (callers hold the folder)
        if other != pending and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    if not pending.is_dir():
        return
    target.mkdir(exist_ok=True)
    saved, new = target / "overrides.yaml", pending / "overrides.yaml"
    if resumed and saved.is_file() and new.is_file():
        merged = merge_overrides(_read_list(saved), _read_list(new))
        write_text_atomic(new, OmegaConf.to_yaml(merged))
    for path in pending.iterdir():
        os.replace(path, target / path.name)
    pending.rmdir()


def _read_list(path: Path) -> list[str]:
    return [str(o) for o in (OmegaConf.load(path) or [])]


@contextlib.contextmanager
def hydra_files_guard(run_dir: Path) -> Iterator[None]:
    """Around a Hydra job: if the task did not commit its `.hydra-pending/` files, keep them only when the folder had
    no `.hydra/` before (a fresh folder's record of what ran, even if it failed); otherwise drop them, so that a
    refused or failed attempt leaves the earlier run's `.hydra/` as it was."""
    run_dir = Path(run_dir)
    fresh = not (run_dir / HYDRA_DIR).exists()
    log_sizes = {p: p.stat().st_size for p in run_dir.glob("*.log")}
    try:
        yield
    except FolderBusyError:  # the folder is another live process's: touch nothing of it, drop only our own files
        shutil.rmtree(staging_dir(run_dir), ignore_errors=True)
        raise
    except RanprmError:  # refused before anything ran (one line, exit 2): a folder this attempt made goes again
        if fresh:
            _remove_refused_attempt(run_dir)
        raise
    finally:
        if staging_dir(run_dir).is_dir():
            if fresh:
                commit_hydra_files(run_dir)
            else:
                shutil.rmtree(staging_dir(run_dir), ignore_errors=True)
                for path, size in log_sizes.items():  # the refused attempt's lines went to the console
                    with contextlib.suppress(OSError), open(path, "r+b") as handle:
                        handle.truncate(size)


def _remove_refused_attempt(run_dir: Path) -> None:
    """What a refused attempt left in a fresh folder: its staging files, empty logs, then the folder if empty."""
    shutil.rmtree(staging_dir(run_dir), ignore_errors=True)
    for path in run_dir.glob("*.log"):
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()


def staging_dir(run_dir: Path) -> Path:
    """This process's Hydra staging folder in `run_dir` (Hydra's `output_subdir` when a Hydra job runs)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().output_subdir:
        return Path(run_dir) / str(HydraConfig.get().output_subdir)
    return Path(run_dir) / f"{STAGING_PREFIX}-{os.getpid()}"


def register_pid_resolver() -> None:
    """`${ranprm_pid:}`: this process's id, for the per-process staging folder of conf/hydra/default.yaml."""
    OmegaConf.register_new_resolver("ranprm_pid", os.getpid, replace=True)


# --- one process per folder ---------------------------------------------------------------------------------------

_HELD: dict[Path, int] = {}  # folders this process holds, with how many nested `hold_folder`s hold each


def _is_first_rank() -> bool:
    """The process that owns the folders: the launching process, or global rank 0 under torchrun / SLURM / DDP
    (the other ranks of the same command write their own files into the folder the first one holds)."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(variable)
        if value is not None and value.strip().isdigit():
            return int(value) == 0
    return True


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "pid unknown"


@contextlib.contextmanager
def hold_folder(folder: Path, option: str) -> Iterator[Path]:
    """Own `folder` (created if missing) for the block: an exclusive `flock` on `<folder>/.ranprm.lock`, or one line
    naming the process that holds it (`FolderBusyError`). Nested holds of the same folder in one process, and the
    non-first ranks of a multi-process run, take no second lock. The lock file is removed on release; a folder this
    call created is removed again when it is still empty (a refused command leaves nothing behind).

    A read-only or missing-parent location, or a file where the folder should be, is one line naming `option`.
    """
    folder = Path(folder).expanduser().absolute()
    key = folder.resolve() if folder.exists() else folder
    if key in _HELD or not _is_first_rank():
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one process per folder is then the user's to keep
        yield folder
        return
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{option}={str(folder)!r} is a file; give a folder")
    created = not folder.exists()
    lock_path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(lock_path, "a+")  # noqa: SIM115 (held open for the block: the lock lives with it)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise FolderBusyError(
                    f"{option}={folder} is in use by another ranprm process ({_holder(lock_path)}); wait for it to "
                    "end or choose another folder"
                ) from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    except OSError as err:
        raise RunFolderError(
            f"{option}={str(folder)!r} is not writable ({err.strerror or err}); choose another folder or fix its "
            "permissions"
        ) from err
    key = folder.resolve()
    _HELD[key] = 1
    try:
        yield folder
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock_path.unlink()  # still locked: a process that opened it meanwhile sees another inode and retries
        handle.close()
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def check_run_folder(folder: str | Path, option: str) -> None:
    """A one-line ConfigError when `folder` (the run or sweep folder `option` names) cannot be made and written: a
    file in its place or above it, a read-only mount. When it lies under `$RANPRM_LOG_DIR`, that variable is checked
    first and named: it is what the user set. Nothing is left behind (`check_writable` removes what it made)."""
    log_dir = os.environ.get(LOG_DIR_VARIABLE)
    folder = Path(folder).expanduser().absolute()
    if log_dir:
        root = Path(log_dir).expanduser().absolute()
        if folder == root or root in folder.parents:
            check_writable(root, LOG_DIR_VARIABLE)
    check_writable(folder, option)


class RunFolderCheck(Callback):
    """Hydra callback: `check_run_folder` on the run folder (or a multirun's sweep folder) before Hydra makes it;
    a failure is one line and exit code 2, as any user error (`HYDRA_FULL_ERROR=1`: the traceback). Hydra turns
    exceptions raised by callbacks into warnings, hence the exit from here."""

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(folder: str, option: str) -> None:
        from ranprm.cli.config import report_user_errors

        report_user_errors(check_run_folder)(folder, option)
