"""Faults: a killed or pre-empted run resumes to the same number of steps; interrupted writes lose nothing."""

from __future__ import annotations

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
from ranprm.utils.io import write_json_atomic, write_text_atomic
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


def _start(voc_root: Path, run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ranprm.train", *_overrides(voc_root), f"hydra.run.dir={run_dir}", *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc {proc.returncode}) before {path} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def _finish(proc: subprocess.Popen[str], timeout: float = 240.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _uninterrupted_steps(voc_root: Path, out: Path) -> int:
    train(compose("train", [*_overrides(voc_root), f"paths.output_dir={out}"]))
    return json.loads((out / "metrics.json").read_text())["global_step"]


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
    assert not list(last.parent.glob(".*.tmp"))  # no half-written checkpoint left over

    resumed = _start(voc_root, run_dir, "ckpt_path=last")
    _finish(resumed)
    summary = json.loads((run_dir / "metrics.json").read_text())

    expected = _uninterrupted_steps(voc_root, tmp_path / "straight")
    assert expected == EPOCHS * STEPS_PER_EPOCH
    assert summary["global_step"] == expected
    assert summary["epochs"] == EPOCHS


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_to_resume_from(voc_root, tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(voc_root, run_dir)
    _wait_for(last, proc)
    epoch_end = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "received SIGTERM: saved" in out + err, (out + err)[-3000:]
    assert not (run_dir / "metrics.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] >= epoch_end  # the state at the signal, not only the last epoch end
    assert proc.returncode == 0  # Lightning exits via SIGTERMException (a SystemExit without a code)

    resumed = _start(voc_root, run_dir, "ckpt_path=last")
    _finish(resumed)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["epochs"] == EPOCHS
    # Lightning restarts the interrupted epoch from its first batch (the loader is not resumable) but keeps the
    # saved step counter and stops at max_epochs: measured, the total matches an uninterrupted run.
    assert summary["global_step"] == EPOCHS * STEPS_PER_EPOCH


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
