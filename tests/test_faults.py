"""Faults: a killed or pre-empted run resumes to the same number of steps; interrupted writes lose nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ranprm.cli.config import compose
from ranprm.lightning.checkpoint import AtomicCheckpointIO
from ranprm.train import train
from ranprm.utils.io import TEMP_SUFFIX, write_json_atomic, write_text_atomic
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
STEPS_PER_EPOCH = 3  # 6 training images, batch 2


def _overrides(voc_root: Path) -> list[str]:
    return [
        o
        for o in tiny_overrides(voc_root, Path("unused"))
        if not o.startswith(("paths.output_dir", "data.batch_size", "trainer.max_epochs"))
    ] + ["data.batch_size=2", f"trainer.max_epochs={EPOCHS}", "eval.max_images=1", "callbacks.panels.num_images=0"]


def _start(voc_root: Path, run_dir: Path, *extra: str, args: list[str] | None = None) -> subprocess.Popen[str]:
    """Training in a subprocess that leads its own process group (as a batch job does), so the test can signal
    the whole group the way SLURM does without signalling pytest."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    given = args if args is not None else [*_overrides(voc_root), f"hydra.run.dir={run_dir}"]
    keys = {e.split("=", 1)[0] for e in extra}
    given = [a for a in given if a.split("=", 1)[0] not in keys]  # a later value replaces, Hydra refuses doubles
    return subprocess.Popen(
        [sys.executable, "-m", "ranprm.train", *given, *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before {path} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen[str], timeout: float = 240.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _uninterrupted(voc_root: Path, out: Path, *extra: str) -> dict:
    """metrics.json of the same run without interruption, in a subprocess with the same threads as the others."""
    _finish(_start(voc_root, out, *extra))
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_reaches_the_same_step_count(voc_root, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(voc_root, run_dir)
    _wait_for(last, proc)  # written at the end of the first epoch
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()  # it really died before finishing
    killed_at = torch.load(last, map_location="cpu", weights_only=True)
    assert killed_at["global_step"] < EPOCHS * STEPS_PER_EPOCH
    # A SIGKILL during a checkpoint write leaves its temp file (the 55 MB leftover of issue 18); the next run in the
    # folder removes it. Stand-in: a temp file of ranprm's naming from a process that no longer exists.
    dead = _dead_pid()
    leftover = last.parent / f".last.ckpt.{_host()}.{dead}.0123abcd{TEMP_SUFFIX}"
    leftover.write_bytes(b"half a checkpoint")
    legacy = last.parent / f".last.ckpt.{dead}.tmp"  # the naming of ranprm <= 0.1
    legacy.write_bytes(b"half a checkpoint")

    resumed = _start(voc_root, run_dir, "ckpt_path=last")
    _finish(resumed)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert not leftover.exists() and not legacy.exists()
    assert summary["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert summary["epochs"] == EPOCHS
    assert summary["resumed_from"] == str(last)
    # validation is the evaluated split here (no held-out images), so no best checkpoint is kept: last.ckpt only
    assert summary["best_checkpoint"] is None and summary["checkpoint_selection"]["selected"] == "last"
    assert Path(summary["last_checkpoint"]).is_file()


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_exits_143_and_resumes_exactly(voc_root, tmp_path):
    """Issue 18, item 1: SLURM signals the whole process group. The loader worker ignores it, the main process saves
    `last.ckpt` at the next batch boundary, records `interrupted.json` and exits 143 (128 + SIGTERM), and
    `resume=<run dir>` ends with the same step count and the same metrics as the uninterrupted run."""
    workers = ["data.num_workers=1", "data.persistent_workers=true"]
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(voc_root, run_dir, *workers)
    _wait_for(last, proc)  # the first epoch ended: the signal lands inside a later one
    epoch_end = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "killed by signal" not in err  # the worker did not die first
    lines = [line for line in err.splitlines() if line.startswith("ranprm:")]
    assert lines == [f"ranprm: interrupted: SIGTERM: {lines[0].split('SIGTERM: ', 1)[1]}"]
    assert f"resume={run_dir}" in lines[0]
    assert not (run_dir / "metrics.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert epoch_end <= saved["global_step"] < EPOCHS * STEPS_PER_EPOCH  # the state at the signal
    record = json.loads((run_dir / "interrupted.json").read_text())
    assert record["global_step"] == saved["global_step"] and record["checkpoint"] == str(last)

    _finish(_start(voc_root, run_dir, args=[f"resume={run_dir}"]))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert not (run_dir / "interrupted.json").exists()
    straight = _uninterrupted(voc_root, tmp_path / "straight", *workers)
    assert straight["global_step"] == resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert resumed["metrics"] == straight["metrics"]  # bit for bit: same batches, same flips, same steps
    assert resumed["instance_metrics"] == straight["instance_metrics"]


@pytest.mark.slow
def test_sigterm_in_a_sweep_records_the_job_as_interrupted_and_ends_the_sweep(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *_overrides(voc_root), "threshold=mean,q3", f"hydra.sweep.dir={sweep}"]
    proc = _start(voc_root, sweep, args=args)
    _wait_for(sweep / "0" / "checkpoints" / "last.ckpt", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert (sweep / "0" / "interrupted.json").is_file() and not (sweep / "0" / "metrics.json").exists()
    assert not (sweep / "1").exists()  # the sweep ended: the scheduler wants the process gone
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "interrupted")]
    assert "1 interrupted" in (sweep / "summary.md").read_text()
    # one command continues the sweep: the interrupted job resumes, the job never started runs (issue 27)
    command = err.strip().splitlines()[-1].split("continue the whole sweep with `", 1)[1].rstrip("`")
    assert command.startswith("python -m ranprm.train -m ") and f"hydra.sweep.dir={sweep}" in command
    proc = _start(voc_root, sweep, args=args)  # that command: the same arguments into the same sweep folder
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "ok"), ("1", "ok")]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["resumed_from"].endswith("last.ckpt")
    proc = _start(voc_root, sweep, args=args)  # once more: every job finished, nothing runs again
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "finished earlier; skipped" in out + err, err[-3000:]  # Hydra logs to stdout


def _host() -> str:
    from ranprm.utils.io import _host as host

    return host()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- atomic writes -----------------------------------------------------------------------------------------------


def test_failed_metrics_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"global_step": 4})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})  # not serialisable: fails before anything is written

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "{}")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left behind


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(2)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="killed while writing"):
        io.save_checkpoint({"global_step": 6, "w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_through_the_atomic_writer(voc_root, tmp_path, monkeypatch):
    written: list[Path] = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        written.append(Path(path))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    train(compose("train", tiny_overrides(voc_root, tmp_path) + ["trainer.max_epochs=1"]))
    assert tmp_path / "checkpoints" / "last.ckpt" in written
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "c.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "c.ckpt").stat().st_mode & 0o777 == 0o640


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from ranprm.errors import CheckpointError

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 3}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"cannot write the checkpoint .*last\.ckpt \(No space left on device\)"):
        io.save_checkpoint({"global_step": 6}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_only_stale_ranprm_temp_files_are_removed(tmp_path):
    from ranprm.utils.io import STALE_AFTER_S, clean_stale_temp_files, temp_path_for

    dead = _dead_pid()
    mine = temp_path_for(tmp_path / "metrics.json")  # this live process: being written right now
    alive = tmp_path / f".last.ckpt.{_host()}.{os.getppid()}.00ff{TEMP_SUFFIX}"  # another live process
    stale = tmp_path / f".last.ckpt.{_host()}.{dead}.00ff{TEMP_SUFFIX}"
    fresh_remote = tmp_path / f".last.ckpt.othernode.{dead}.00ff{TEMP_SUFFIX}"  # another host: pid means nothing
    old_remote = tmp_path / f".best.ckpt.othernode.{dead}.00ff{TEMP_SUFFIX}"
    user_file = tmp_path / ".notes.tmp"
    for p in (mine, alive, stale, fresh_remote, old_remote, user_file):
        p.write_bytes(b"x")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old_remote, (past, past))
    assert sorted(p.name for p in clean_stale_temp_files(tmp_path)) == sorted([stale.name, old_remote.name])
    assert all(p.exists() for p in (mine, alive, fresh_remote, user_file))


def test_the_sweep_summary_counts_interrupted_jobs_apart(tmp_path):
    from ranprm.cli.sweep import collect, write_summary

    for num in range(3):
        (tmp_path / str(num)).mkdir()
    (tmp_path / "2" / "failed.json").write_text('{"error_type": "E", "error": "x"}')
    (tmp_path / "0" / "metrics.json").write_text('{"metrics": {"val/cls_map": 0.5}, "global_step": 9}')
    (tmp_path / "1" / "metrics.json").write_text('{"metrics": {}, "global_step": 3}')  # from before a resume
    (tmp_path / "1" / "interrupted.json").write_text(
        '{"signal": "SIGTERM", "global_step": 5, "resume": "ranprm-train resume=x"}'
    )
    rows = collect(tmp_path)
    assert [r["status"] for r in rows] == ["ok", "interrupted", "failed"]
    assert rows[1]["global_step"] == 5 and "SIGTERM at step 5" in rows[1]["error"]
    _, md = write_summary(tmp_path)
    assert "3 jobs, 1 ok, 1 failed or missing, 1 interrupted" in md.read_text()


@pytest.mark.parametrize(("bar", "shown"), [("none", False), ("tqdm", True)])
def test_progress_bar_none_shows_no_bar_at_all(voc_root, tmp_path, bar, shown):
    from ranprm.cli.build import build_trainer

    cfg = compose("train", [*tiny_overrides(voc_root, tmp_path), f"callbacks.progress_bar={bar}"])
    trainer = build_trainer(cfg, tmp_path, loggers=[])
    assert (trainer.progress_bar_callback is not None) == shown  # Lightning adds its own bar unless told not to
