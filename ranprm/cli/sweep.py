"""Multirun support: per-job failure records and the sweep summary table.

`SweepSummary` is a Hydra callback (registered in `conf/hydra/default.yaml`). When a multirun ends it reads every
job folder under the sweep folder and writes `summary.csv` and `summary.md`: one row per job with its overrides,
its status (ok | failed | interrupted | missing) and its final metrics (the instance metrics under the names the
job's evaluators gave them, recorded in its metrics.json; for `ranprm-evaluate -m` jobs the evaluation's metrics,
or with `variants=` the best variant and each variant's ranked metric). A job that raised has a `failed.json`
instead of a `metrics.json` (see `record_failure`); a job stopped by SIGTERM after saving a checkpoint has an
`interrupted.json` (written by `ranprm.train`); a job with none of them (killed, still running) is `missing`.

A SIGTERM ends the whole sweep, not only its job (the scheduler wants the process gone): the interrupted job is
recorded, the summary is written for the jobs that ran, and the process exits non-zero. A sweep in which a job
failed runs its other jobs, then exits 1 after the summary, naming the failed jobs.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ranprm.utils.io import write_json_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILED_FILE = "failed.json"
METRICS_FILE = "metrics.json"
INTERRUPTED_FILE = "interrupted.json"


def record_failure(job_dir: Path, err: BaseException, overrides: list[str] | None = None) -> Path:
    """Write `<job_dir>/failed.json` with the error, so the sweep summary can report the job as failed."""
    path = Path(job_dir) / FAILED_FILE
    write_json_atomic(
        path,
        {
            "error_type": type(err).__name__,
            "error": str(err),
            "overrides": list(overrides or []),
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
        },
    )
    return path


def run_job(task: Callable[[DictConfig], T], cfg: DictConfig) -> T | None:
    """Run one Hydra job. In a multirun one failed job must not stop the others: record it and return None.

    Not recorded as a failure, and not swallowed: a `RunInterrupted` (SIGTERM; the task wrote `interrupted.json`)
    ends the sweep after writing its summary, and a `RunFolderError` (the job's folder holds another run's results)
    ends it before anything is replaced. The job's `.hydra/` files are kept or dropped by `hydra_files_guard`.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ranprm.cli.run_dir import hold_folder, hydra_files_guard
    from ranprm.errors import RunFolderError, RunInterrupted
    from ranprm.utils.stop import StopRequested

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    option = "hydra.sweep.dir" if hydra_cfg.mode == RunMode.MULTIRUN else "hydra.run.dir"
    if option == "hydra.run.dir" and cfg.get("output") is not None and hydra_cfg.run.dir == cfg.output:
        option = "output"  # conf/hydra: a task given output=DIR runs there; the messages name what the user gave
    with hydra_files_guard(job_dir), hold_folder(job_dir, option):
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return task(cfg)
        try:
            return task(cfg)
        except (RunInterrupted, StopRequested) as err:
            sweep_dir = Path(hydra_cfg.sweep.dir)
            log.error("job %s interrupted: ending the sweep; summary in %s", hydra_cfg.job.num, sweep_dir)
            with contextlib.suppress(Exception):  # the summary must not hide the interruption
                write_summary(sweep_dir)
            again = continue_command(sweep_dir)
            if isinstance(err, RunInterrupted):
                raise RunInterrupted(f"{err}; or continue the whole sweep with `{again}`", err.signal_name,
                                     err.exit_code, err.checkpoint) from None  # fmt: skip
            raise RunInterrupted(f"{err.signal_name}: continue the sweep with `{again}`", err.signal_name,
                                 err.exit_code, None) from None  # fmt: skip
        except RunFolderError:
            raise
        except Exception as err:
            path = record_failure(job_dir, err, list(hydra_cfg.overrides.task))
            log.error("job %s failed: %s: %s (details in %s)", hydra_cfg.job.num, type(err).__name__, err, path)
            return None


def continue_command(sweep_dir: Path) -> str:
    """The command that continues this sweep: the same command line, into the same sweep folder (finished jobs
    are skipped, interrupted ones resume: `ranprm.cli.run_dir.plan_training_folder`)."""
    from ranprm.cli.resume import quote_override_value
    from ranprm.cli.run_dir import override_key

    args = [a for a in sys.argv[1:] if override_key(a) != "hydra.sweep.dir"]
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "ranprm-train"
    if program in ("__main__.py", "train.py"):
        program = "python -m ranprm.train"
    return " ".join([program, *(shlex.quote(a) for a in args),
                     shlex.quote(f"hydra.sweep.dir={quote_override_value(str(sweep_dir))}")])  # fmt: skip


def same_sweep_job(job_dir: Path) -> bool:
    """True in a multirun whose job folder holds an earlier start of this very job (the same overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    saved = Path(job_dir) / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return False
    from ranprm.cli.run_dir import ATTEMPT_KEYS, override_key

    def job(overrides: list[str]) -> list[str]:
        return [o for o in overrides if override_key(o) not in ATTEMPT_KEYS]

    return job([str(o) for o in OmegaConf.load(saved) or []]) == job(list(HydraConfig.get().overrides.task))


def _read_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in OmegaConf.load(path)]
    failed = job_dir / FAILED_FILE
    if failed.is_file():
        return list(json.loads(failed.read_text()).get("overrides", []))
    return []


def _job_dirs(sweep_dir: Path) -> list[Path]:
    found: set[Path] = set()
    for pattern in (METRICS_FILE, FAILED_FILE, INTERRUPTED_FILE, ".hydra/overrides.yaml"):
        for path in sweep_dir.rglob(pattern):
            job = path.parent.parent if pattern.startswith(".hydra") else path.parent
            if job != sweep_dir and ".submitit" not in job.parts:
                found.add(job)

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)

    return sorted(found, key=order)


def instance_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The metrics of a `metrics.json` instance record, named by the evaluators that made it (`metric_names`).

    A record written before `metric_names` existed gives its top-level numbers other than counts."""
    names = record.get("metric_names")
    if names is None:
        names = [k for k, v in record.items() if isinstance(v, int | float) and not k.startswith("num_")]
    return {name: record[name] for name in names if name in record}


def evaluation_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """The summary columns of a `ranprm-evaluate` metrics.json (none for a training run's): its metrics under their
    names; with `variants=`, the best variant and each variant's `ranked_by` metric as `<variant>/<metric>`."""
    if "variants" in record:
        ranked_by = record.get("ranked_by")
        columns: dict[str, Any] = {"best_variant": record["variants"][0]["name"] if record["variants"] else ""}
        columns.update({f"{v['name']}/{ranked_by}": v["metrics"].get(ranked_by) for v in record["variants"]})
        return columns
    if record.get("mode") in ("ckpt", "predictions"):
        return instance_metrics(record)
    return {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder under `sweep_dir`: job, status, overrides, error, metrics, instance metrics."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for job_dir in _job_dirs(sweep_dir):
        row: dict[str, Any] = {
            "job": job_dir.relative_to(sweep_dir).as_posix(),
            "status": "missing",
            "overrides": " ".join(_read_overrides(job_dir)),
            "error": "",
        }
        metrics_path, failed_path = job_dir / METRICS_FILE, job_dir / FAILED_FILE
        interrupted_path = job_dir / INTERRUPTED_FILE
        if interrupted_path.is_file():  # newer than any metrics.json: a resumed run that finished removes it
            record = json.loads(interrupted_path.read_text())
            row["status"] = "interrupted"
            row["global_step"] = record.get("global_step")
            row["error"] = (
                f"{record.get('signal', 'signal')} at step {record.get('global_step')}; {record.get('resume', '')}"
            )
        elif metrics_path.is_file():
            summary = json.loads(metrics_path.read_text())
            row["status"] = "ok"
            row["wall_s"] = summary.get("wall_s")
            row["global_step"] = summary.get("global_step")
            row.update(summary.get("metrics", {}))
            row.update({f"instance/{k}": v for k, v in instance_metrics(summary.get("instance_metrics") or {}).items()})
            row.update(evaluation_metrics(summary))
        elif failed_path.is_file():
            failure = json.loads(failed_path.read_text())
            row["status"] = "failed"
            row["error"] = f"{failure.get('error_type', 'Error')}: {failure.get('error', '')}".strip()
        else:
            row["error"] = "no metrics.json or failed.json (killed or still running?)"
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.md` into `sweep_dir`; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    fixed = ["job", "status", "overrides"]
    extra = sorted({k for r in rows for k in r} - set(fixed) - {"error"})
    columns = fixed + extra + ["error"]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    failed = sum(r["status"] in ("failed", "missing") for r in rows)
    interrupted = sum(r["status"] == "interrupted" for r in rows)
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs, {len(rows) - failed - interrupted} ok, {failed} failed or missing"
        + (
            f", {interrupted} interrupted (resume each with `ranprm-train resume=<job folder>`)."
            if interrupted
            else "."
        ),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in rows:
        cells = [_fmt(r.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    """Hydra callback: after a multirun, write the sweep folder's summary.csv and summary.md."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        try:
            csv_path, md_path = write_summary(sweep_dir)
        except Exception as err:  # a summary problem must not hide the jobs' own results
            log.warning("could not write the sweep summary in %s: %s", sweep_dir, err)
            return
        log.info("sweep summary: %s, %s", csv_path, md_path)
        print(f"sweep summary: {md_path}")
        rows = collect(sweep_dir)
        failed = [r["job"] for r in rows if r["status"] in ("failed", "missing")]
        if failed:  # a scheduler or script must see that the sweep did not do all it was asked to
            shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            print(f"ranprm: error: {len(failed)} of {len(rows)} jobs failed or are missing ({shown}); see {md_path}",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(1)
