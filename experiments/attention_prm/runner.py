"""Run the study's cells: each one training followed at once by the evaluation of every inference variant of its
checkpoint, written as one JSON file into `<out>/cells/` when, and only when, all of it finished.

- **Resumable.** A cell whose file exists is finished and skipped. A cell's training and evaluations live in its
  scratch folder (`<scratch>/<data>/<trunk>/seed<k>/`, outside git): an interrupted training is resumed from its
  checkpoint (`ranprm-train resume=...`), a training folder without a checkpoint is cleared and started again, and
  evaluations that finished are reused. The cell file is written atomically, last: an interrupted cell leaves no
  file, and a reader never sees half of one.
- **Within a budget.** `budget_min`: no cell starts whose estimated duration would end it after that many minutes
  from the runner's start; the estimate is the mean wall time of the finished cells of the same data and trunk,
  else the grid's stated default.
- **Signals.** SIGTERM, SIGINT and SIGHUP are passed to the running training or evaluation (a training saves its
  checkpoint and stops), and the runner exits 143 (130 for SIGINT) without writing that cell.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.attention_prm.analysis import pack_records
from experiments.attention_prm.grid import Cell, Grid, Variant
from ranprm.utils.io import load_torch_file, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
CELL_FORMAT = 1


class CellInterrupted(Exception):
    """A signal stopped a cell; `code` is the exit status the runner ends with."""

    def __init__(self, cell: Cell, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} during cell {cell.id}")
        self.code = 128 + signum


class StepFailed(Exception):
    """A training or evaluation of a cell exited non-zero."""


# ------------------------------------------------------------------------------------------------- child processes
@dataclass
class Children:
    """The one running child process, and the signal that asked everything to stop (None: none did)."""

    current: subprocess.Popen[bytes] | None = None
    stop_signal: int | None = None

    def handle(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        if self.current is not None and self.current.poll() is None:
            self.current.send_signal(signal.SIGTERM)  # ranprm saves its checkpoint on SIGTERM and exits 143

    @contextmanager
    def installed(self) -> Iterator[None]:
        signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {s: signal.signal(s, self.handle) for s in signums}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self, cell: Cell, args: list[str], log_path: Path) -> None:
        """Run `python -m <args>` from the repository root with this checkout's package first on the path, its
        output to `log_path`; raise CellInterrupted after a signal, StepFailed on a non-zero exit."""
        if self.stop_signal is not None:
            raise CellInterrupted(cell, self.stop_signal)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("WANDB_MODE", "disabled")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n$ python -m {' '.join(args)}\n".encode())
            log.flush()
            self.current = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
            try:
                code = self.current.wait()
            finally:
                self.current = None
        if self.stop_signal is not None:
            raise CellInterrupted(cell, self.stop_signal)
        if code != 0:
            raise StepFailed(f"cell {cell.id}: `python -m {args[0]}` exited {code}; see {log_path}")


# ---------------------------------------------------------------------------------------------------- one cell
def cell_path(out: Path, cell: Cell) -> Path:
    return out / "cells" / cell.file_name


def scratch_dir(scratch: Path, cell: Cell) -> Path:
    return scratch / cell.id


def train_cell(grid: Grid, cell: Cell, work: Path, children: Children) -> Path:
    """Train the cell's model into `work/train` (resuming an interrupted training); its folder."""
    run_dir = work / "train"
    if (run_dir / "metrics.json").is_file():
        return run_dir  # trained in an earlier session; its evaluations were interrupted
    if any((run_dir / "checkpoints").glob("*.ckpt")):
        children.run(cell, ["ranprm.train", f"resume={run_dir}"], work / "train.log")
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # started but never checkpointed: nothing to keep
    overrides = [*grid.train_overrides, *cell.data.overrides, *cell.trunk.overrides, f"seed={cell.seed}",
                 f"trainer.max_epochs={cell.data.epochs}", f"hydra.run.dir={run_dir}"]  # fmt: skip
    children.run(cell, ["ranprm.train", *overrides], work / "train.log")
    return run_dir


def variants_override(variants: Sequence[Variant], attention: bool, coco: Sequence[Variant] = ()) -> str:
    """`variants=[...]` naming each variant as the study does, scored by the `voc` protocol, then each of `coco`
    again by the `coco` protocol (named `<name>/coco`; evaluate predicts once for both); the gradient path only on
    trunks with masks (the others have one path, and evaluate refuses mask_grad on them)."""
    entries = []
    for protocol, names, group in (("voc", "{}", variants), ("coco", "{}/coco", coco)):
        for v in group:
            grad = f",mask_grad:{v.mask_grad}" if attention else ""
            entries.append(f"{{name:'{names.format(v.name)}',threshold:{v.threshold},retrieval:{v.retrieval}{grad},"
                           f"protocol:{protocol}}}")  # fmt: skip
    return f"variants=[{','.join(entries)}]"


Evaluated = dict[str, tuple[dict[str, Any], Any]]  # variant name -> (its metrics.json entry, its per-image records)


def evaluate_variants(
    grid: Grid, cell: Cell, ckpt: Path, variants: Sequence[Variant], coco: Sequence[Variant], out: Path,
    children: Children,
) -> tuple[Evaluated, Evaluated, dict[str, Any]]:  # fmt: skip
    """Every variant of `ckpt` under the `voc` protocol and those of `coco` under the `coco` protocol, in one pass
    (`ranprm-evaluate variants=`: one forward, the PRMs once per peak and gradient path, one prediction for both
    protocols): ({name: (metrics.json entry, per-image records)} for each protocol (the coco ones without records),
    what the evaluation says of itself: wall time, image size, skipped images).

    The one place the study calls `ranprm-evaluate`; an evaluation that finished in an earlier session is reused
    when it holds every variant asked for. `class_q3` is calibrated on the training split, never on the images it
    is scored on.
    """
    wanted = [v.name for v in variants] + [f"{v.name}/coco" for v in coco]
    metrics = out / "metrics.json"
    if not metrics.is_file() or not set(wanted) <= {e["name"] for e in json.loads(metrics.read_text())["variants"]}:
        args = ["ranprm.evaluate", f"ckpt={ckpt}", f"output={out}", "overwrite=true", "records=true",
                "progress_bar=none", *cell.data.overrides, *grid.eval_overrides,
                variants_override(variants, cell.trunk.attention, coco)]  # fmt: skip
        if any(v.threshold == "class_q3" for v in (*variants, *coco)):
            args.append("calibration.split=train")
        children.run(cell, args, out.parent / f"{out.name}.log")
    written = json.loads(metrics.read_text())
    by_name = {entry["name"]: entry for entry in written["variants"]}
    recs = load_torch_file(out / "records.pt", "records")
    facts = ("wall_s", "image_size", "image_size_from", "skipped_images", "split")
    about = {k: written[k] for k in facts if k in written}
    voc_results = {v.name: (by_name[v.name], recs.get(v.name)) for v in variants}
    return voc_results, {v.name: (by_name[f"{v.name}/coco"], None) for v in coco}, about


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    # threads: what the cell's commands inherit (OMP_NUM_THREADS, else torch's default); its times depend on it
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


def git_commit() -> dict[str, Any]:
    """The checkout's commit and whether its code (ranprm/, conf/, this study) differed from it."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no", "--", "ranprm", "conf", "experiments/attention_prm")
    return {"commit": git("rev-parse", "HEAD").strip() or None, "code_changed": bool(changed.strip())}


def _load_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {}  # type: ignore[return-value]


def _add_time(work: Path, key: str, seconds: float) -> dict[str, float]:
    """Accumulate the wall time spent on a cell's parts across sessions (`work/timing.json`)."""
    path = work / "timing.json"
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing[key] = round(timing.get(key, 0.0) + seconds, 1)
    write_json_atomic(path, timing)
    return timing


@contextmanager
def _timed(work: Path, key: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        _add_time(work, key, time.monotonic() - started)


def run_cell(grid: Grid, cell: Cell, out: Path, scratch: Path, children: Children) -> dict[str, Any]:
    """Train, evaluate every variant, write the cell's file; return what it holds."""
    work = scratch_dir(scratch, cell)
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with _timed(work, "train_s"):
        run_dir = train_cell(grid, cell, work, children)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with _timed(work, "evaluate_s"):
        coco_names = [v for v in grid.coco_variants if cell.trunk.attention or v.endswith("/full")]
        coco_variants = [Variant.parse(v) for v in coco_names]
        voc, coco, about = evaluate_variants(grid, cell, ckpt, grid.variants(cell.trunk), coco_variants,
                                             work / "eval", children)  # fmt: skip
    timing = json.loads((work / "timing.json").read_text())
    header = load_torch_file(ckpt, "ckpt", mmap=True)
    training = json.loads((run_dir / "metrics.json").read_text())
    record = {
        "format": CELL_FORMAT,
        "cell": cell.id,
        "grid": grid.name,
        "data": cell.data.name,
        "trunk": cell.trunk.name,
        "seed": cell.seed,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "last_session_started": started,
        "wall_s": round(timing.get("train_s", 0.0) + timing.get("evaluate_s", 0.0), 1),
        "timing": timing,
        "machine": machine(),
        "git": git_commit(),
        "class_names": list(header["hyper_parameters"]["class_names"]),
        "train_overrides": [*grid.train_overrides, *cell.data.overrides, *cell.trunk.overrides],
        "config": _load_config(run_dir),
        "training": {k: training.get(k) for k in ("metrics", "epochs", "global_step", "wall_s", "resumed_from")},
        "evaluation": {"voc": about, "coco": about},  # one pass scores both
        "variants": {name: _variant_entry(metrics) for name, (metrics, _) in voc.items()},
        "coco": {name: _variant_entry(metrics) for name, (metrics, _) in coco.items()},
        "records": pack_records({name: recs for name, (_, recs) in voc.items()}),
    }
    write_json_atomic(cell_path(out, cell), record, compact=True)
    return record


def _variant_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """What a cell keeps of one variant's evaluation: its metrics, per-class APs (with each class's ground-truth
    count) and counts, its full inference settings."""
    return {k: entry.get(k) for k in ("metrics", "per_class", "counts", "settings", "protocol")}


# ---------------------------------------------------------------------------------------------------- the grid
def finished_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def estimate_minutes(grid: Grid, cell: Cell, finished: Sequence[dict[str, Any]]) -> float:
    """Minutes the cell should take: the mean wall time of finished cells of its data and trunk, else the grid's
    stated default for that kind, else the largest default."""
    key = f"{cell.data.name}/{cell.trunk.name}"
    walls = [c["wall_s"] for c in finished if f"{c['data']}/{c['trunk']}" == key and c.get("wall_s")]
    if walls:
        return sum(walls) / len(walls) / 60
    return grid.default_minutes.get(key, max(grid.default_minutes.values(), default=15.0))


def select(cells: Sequence[Cell], only: str | None) -> list[Cell]:
    """The cells whose id matches one of the comma-separated shell patterns in `only` (all with None)."""
    if not only:
        return list(cells)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


@dataclass
class Plan:
    """What the grid looks like here: each cell's state and estimate."""

    cell: Cell
    state: str  # done | missing | unavailable
    minutes: float
    reason: str = ""


def plan(grid: Grid, out: Path, cells: Sequence[Cell]) -> list[Plan]:
    finished = finished_cells(out)
    rows = []
    for cell in cells:
        minutes = estimate_minutes(grid, cell, finished)
        if cell_path(out, cell).is_file():
            rows.append(Plan(cell, "done", minutes))
        elif (reason := cell.data.missing_reason()) is not None:
            rows.append(Plan(cell, "unavailable", minutes, reason))
        else:
            rows.append(Plan(cell, "missing", minutes))
    return rows


def run_grid(
    grid: Grid, out: Path, scratch: Path, cells: Sequence[Cell], budget_min: float | None = None,
    say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
) -> int:  # fmt: skip
    """Run the missing cells of `cells` in order within the budget; 0 when every started cell finished, 1 when one
    failed (the others still run), 128 + signal when interrupted."""
    started = clock()
    children = Children()
    failed = 0
    with children.installed():
        for row in plan(grid, out, cells):
            if row.state == "done":
                continue
            if row.state == "unavailable":
                say(f"skip {row.cell.id}: {row.reason}")
                continue
            elapsed = (clock() - started) / 60
            if budget_min is not None and elapsed + row.minutes > budget_min:
                say(f"not starting {row.cell.id}: estimated {row.minutes:.1f} min, {budget_min - elapsed:.1f} min of "
                    f"the {budget_min:g}-min budget left")  # fmt: skip
                continue
            say(f"cell {row.cell.id}: starting (estimated {row.minutes:.1f} min)")
            try:
                record = run_cell(grid, row.cell, out, scratch, children)
            except CellInterrupted as err:
                say(f"{err}: nothing of it was written to {out / 'cells'}; run again to continue it (its training "
                    f"resumes from its checkpoint in {scratch_dir(scratch, row.cell)})")  # fmt: skip
                return err.code
            except StepFailed as err:
                say(f"FAILED {err}")
                failed += 1
                continue
            say(f"cell {row.cell.id}: done in {record['wall_s'] / 60:.1f} min -> {cell_path(out, row.cell)}")
    return 1 if failed else 0
