"""Run and output folders: nothing is replaced without overwrite=true, refused attempts leave the folder as it was,
`ckpt_path=last` needs a checkpoint, and `resume=<run dir>` continues a run from its folder alone (issue 18 item 2,
issue 17 item 5)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ranprm.cli.config import compose
from ranprm.cli.resume import check_checkpoint_matches, expand_resume_argv, resume_overrides
from ranprm.cli.run_dir import (
    apply_folder_plan,
    commit_hydra_files,
    hydra_files_guard,
    merge_overrides,
    plan_training_folder,
    staging_dir,
)
from ranprm.errors import ConfigError, RunFolderError
from ranprm.train import train
from ranprm.utils.io import check_writable
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _finished_run(run: Path, with_checkpoint: bool = True) -> None:
    """A run folder as a finished training run leaves it (contents are stand-ins)."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["backbone=tiny", "seed=3"]))
    (run / ".hydra" / "config.yaml").write_text("seed: 3\n")
    (run / "metrics.json").write_text("{}\n")
    if with_checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")


# --- the folder plan -----------------------------------------------------------------------------------------------


def test_a_fresh_or_empty_folder_needs_nothing(tmp_path):
    assert plan_training_folder(tmp_path / "new", None, overwrite=False).resume is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)  # an empty checkpoints/ is no result
    assert plan_training_folder(tmp_path / "empty", None, overwrite=False).remove == ()


def test_a_folder_with_results_is_refused_naming_what_it_holds_and_the_ways_out(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    with pytest.raises(RunFolderError) as info:
        plan_training_folder(run, None, overwrite=False)
    message = str(info.value)
    assert f"run folder {run} already holds metrics.json, checkpoints of an earlier run" in message
    assert f"resume={run}" in message and "overwrite=true" in message and "hydra.run.dir" in message


def test_overwrite_removes_only_the_earlier_runs_results(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "mine.ckpt").write_bytes(b"the user's own")  # issue 27: was deleted unnamed
    (run / "checkpoints" / "best-epoch003.ckpt").write_bytes(b"ckpt")
    (run / "panels" / "epoch_000").mkdir(parents=True)
    (run / "panels" / "epoch_000" / "2024_000001.png").write_bytes(b"png")
    plan = plan_training_folder(run, None, overwrite=True)
    assert (run / "metrics.json").exists()  # planning touches nothing
    apply_folder_plan(plan)
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "notes.txt"]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["mine.ckpt"]


def test_ckpt_path_last_needs_a_checkpoint_and_resolves_to_the_newest(tmp_path):
    run = tmp_path / "run"
    _finished_run(run, with_checkpoint=False)
    with pytest.raises(RunFolderError, match=r"ckpt_path=last: .*checkpoints holds no last\.ckpt to resume from"):
        plan_training_folder(run, "last", overwrite=False)
    with pytest.raises(RunFolderError, match="holds no last.ckpt"):
        plan_training_folder(tmp_path / "nothing", "last", overwrite=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"a")
    hpc = run / "hpc_ckpt_1.ckpt"  # Lightning's SLURM auto-requeue checkpoint, written later
    hpc.write_bytes(b"b")
    os.utime(run / "checkpoints" / "last.ckpt", (1, 1))
    assert plan_training_folder(run, "last", overwrite=False).resume == hpc


def test_a_checkpoint_from_elsewhere_does_not_license_replacing_this_folders_results(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other.ckpt"
    _finished_run(run)
    with pytest.raises(RunFolderError, match="already holds"):
        plan_training_folder(run, str(other), overwrite=False)
    assert plan_training_folder(run, str(run / "checkpoints" / "last.ckpt"), overwrite=False).remove == ()


def test_a_slurm_requeue_resumes_from_the_folders_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _finished_run(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert plan_training_folder(run, None, overwrite=False).resume == run / "checkpoints" / "last.ckpt"


# --- .hydra files ----------------------------------------------------------------------------------------------------


def _stage(run: Path, overrides: list[str]) -> None:
    pending = staging_dir(run)
    pending.mkdir(parents=True)
    (pending / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (pending / "config.yaml").write_text("new: true\n")


def test_a_refused_attempt_leaves_the_earlier_hydra_files_and_log_as_they_were(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    (run / "train.log").write_text("the first run's log\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError), hydra_files_guard(run):
        _stage(run, ["backbone=ran"])  # what Hydra writes before the task runs
        with (run / "train.log").open("a") as log:
            log.write("the refused attempt's line\n")
        plan_training_folder(run, None, overwrite=False)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not staging_dir(run).exists()


def test_a_fresh_folder_keeps_the_record_of_a_failed_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError), hydra_files_guard(run):
        _stage(run, ["backbone=ran"])
        raise ValueError("failed after the folder checks")
    assert OmegaConf.load(run / ".hydra" / "overrides.yaml") == ["backbone=ran"]


def test_a_resume_updates_the_saved_overrides(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    _stage(run, ["backbone=tiny", "seed=3", "trainer.max_epochs=9", "ckpt_path=last"])
    commit_hydra_files(run, resumed=True)
    assert OmegaConf.load(run / ".hydra" / "overrides.yaml") == ["backbone=tiny", "seed=3", "trainer.max_epochs=9"]
    assert (run / ".hydra" / "config.yaml").read_text() == "new: true\n"


def test_merge_overrides_replaces_by_key_and_drops_the_attempts_own_keys():
    saved = ["backbone=tiny", "+trainer.limit_val_batches=2", "ckpt_path=last"]
    new = ["trainer.limit_val_batches=3", "logger=csv", "overwrite=true", "resume=/x"]
    assert merge_overrides(saved, new) == ["backbone=tiny", "trainer.limit_val_batches=3", "logger=csv"]
    # a key the first command line gave twice (Hydra used the last) is replaced once
    twice = ["trainer.max_epochs=2", "seed=1", "trainer.max_epochs=1"]
    assert merge_overrides(twice, ["trainer.max_epochs=3"]) == ["trainer.max_epochs=3", "seed=1"]


# --- resume=<run dir> ------------------------------------------------------------------------------------------------


def test_resume_reads_the_saved_overrides_and_continues_in_the_same_folder(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    expanded = resume_overrides(run, ["trainer.max_epochs=9", "data.num_workers=4"])
    assert expanded == ["backbone=tiny", "seed=3", "trainer.max_epochs=9", "data.num_workers=4",
                        f"hydra.run.dir={run}", "ckpt_path=last"]  # fmt: skip
    assert resume_overrides(run, ["ckpt_path=x.ckpt"])[-1] == f"hydra.run.dir={run}"
    spaced = tmp_path / "my run's"
    _finished_run(spaced)
    assert resume_overrides(spaced, [])[-2] == "hydra.run.dir='" + str(spaced).replace("'", "\\'") + "'"
    argv = expand_resume_argv(["ranprm-train", "--cfg", "job", f"resume={run}", "logger=csv"])
    assert argv == ["ranprm-train", "--cfg", "job", "backbone=tiny", "seed=3", "logger=csv", f"hydra.run.dir={run}",
                    "ckpt_path=last"]  # fmt: skip
    assert expand_resume_argv(["ranprm-train", "logger=csv"]) == ["ranprm-train", "logger=csv"]


@pytest.mark.parametrize(
    ("override", "what"),
    [("backbone=ran", "the architecture"), ("backbone.width=8", "the architecture"),
     ("head.window=5", "the architecture"), ("data.image_size=96", "the data"), ("data=voc", "the data"),
     ("+data.train_fraction=0.5", "the data"),
     ("seed=1", "the data order"), ("optimizer=sgd", "the optimizer"), ("hydra.run.dir=/elsewhere", "own folder")],
)  # fmt: skip
def test_resume_refuses_overrides_that_change_what_the_run_trains(tmp_path, override, what):
    run = tmp_path / "run"
    _finished_run(run)
    with pytest.raises(ConfigError, match=f"resume={run}: .*{what}"):
        resume_overrides(run, [override])


def test_resume_of_a_folder_that_is_not_a_run_or_in_a_sweep_is_one_line(tmp_path):
    with pytest.raises(RunFolderError, match=r"resume=.*nowhere: no \.hydra/overrides\.yaml there"):
        resume_overrides(tmp_path / "nowhere", [])
    with pytest.raises(ConfigError, match="resume= runs one job"):
        expand_resume_argv(["ranprm-train", "-m", f"resume={tmp_path}"])


def test_resume_in_python_names_the_helper(voc_root, tmp_path):
    with pytest.raises(ConfigError, match="resume_overrides"):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path), f"resume={tmp_path}"]))


def test_checkpoint_hyper_parameters_must_match_the_run():
    saved = {"class_names": ["a", "b"], "backbone": {"name": "tiny", "width": 16, "pretrained": "x.pth"},
             "head": {"window": 3}, "image_size": 64, "optimizer": {"name": "adam", "lr": 0.1}}  # fmt: skip
    same = {**saved, "backbone": {**saved["backbone"], "pretrained": False}, "optimizer": {"name": "adam", "lr": 0.5}}
    check_checkpoint_matches(saved, same, Path("c.ckpt"))  # where the first weights came from, and lr, may differ
    for key, value, named in (("image_size", 96, "image_size=64"), ("class_names", ["a"], "class_names="),
                              ("optimizer", {"name": "sgd"}, "optimizer.name='adam'")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"c.ckpt: the checkpoint was trained with {named}"):
            check_checkpoint_matches(saved, {**saved, key: value}, Path("c.ckpt"))


# --- output folders ----------------------------------------------------------------------------------------------


def test_an_unwritable_or_full_output_folder_is_found_first(tmp_path, monkeypatch):
    import shutil

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"output='.*a_file/sub' is not writable"):
        check_writable(blocker / "sub", "output")
    with pytest.raises(ConfigError, match=r"output='.*a_file' is a file"):
        check_writable(blocker, "output")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 2 * 2**20))
    with pytest.raises(ConfigError, match=r"only 2 MiB free on its disk, and this run writes about 100 MiB"):
        check_writable(tmp_path / "out", "output", min_free_bytes=100 * 2**20)
    assert not (tmp_path / "out").exists()  # a failed check leaves no empty folder behind


def test_evaluate_refuses_to_replace_metrics_without_overwrite(voc_root, tmp_path):
    from ranprm.eval import write_results
    from ranprm.evaluate import evaluate
    from tests.test_evaluate import _data, _gt_results

    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}\n')
    args = [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={out}"]
    with pytest.raises(RunFolderError, match=r"output=.*metrics\.json already exists; .*overwrite=true"):
        evaluate(compose("evaluate", args))
    assert (out / "metrics.json").read_text() == '{"mine": 1}\n'
    assert not (out / "per_class.md").exists()
    evaluate(compose("evaluate", [*args, "overwrite=true"]))
    assert json.loads((out / "metrics.json").read_text())["map_r_50"] == pytest.approx(1.0)


# --- end to end: the command line ------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "ranprm.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_refused_and_failed_attempts_leave_the_run_folder_byte_for_byte_and_resume_continues_it(voc_root, tmp_path):
    run = tmp_path / "run"
    args = [o for o in tiny_overrides(voc_root, run) if not o.startswith("paths.")] + ["trainer.max_epochs=1"]
    first = _cli(*args, f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    assert ".hydra/config.yaml" in before and "train.log" in before and "checkpoints/last.ckpt" in before

    again = _cli(*args, f"hydra.run.dir={run}")  # the same command again: would replace everything
    assert again.returncode == 2 and "already holds" in again.stderr and "overwrite=true" in again.stderr
    conflict = _cli(*args, f"hydra.run.dir={run}", "ckpt_path=last", "backbone.width=8")
    assert conflict.returncode == 2 and "trained with backbone.width=16, this run sets 8" in conflict.stderr
    changed = _cli(f"resume={run}", "data.image_size=96")
    assert changed.returncode == 2 and "would change the data" in changed.stderr
    for proc in (again, conflict, changed):
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _snapshot(run) == before  # .hydra/*.yaml, train.log, checkpoints, metrics: nothing changed

    resumed = _cli(f"resume={run}", "trainer.max_epochs=2", "logger=none")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "metrics.json").read_text())
    assert (summary["epochs"], summary["global_step"]) == (2, 4)  # 6 images, batch 4: 2 steps an epoch
    assert summary["best_checkpoint"] is None  # no held-out split: last.ckpt only
    assert Path(summary["last_checkpoint"]).is_file()
    saved = OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert "trainer.max_epochs=2" in saved and "logger=none" in saved and "trainer.max_epochs=1" not in saved
    assert not any(str(o).startswith(("ckpt_path", "resume", "hydra.")) for o in saved)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_a_moved_run_folder_resumes_and_metrics_name_files_that_exist(voc_root, tmp_path):
    """Lightning restores `best_model_path` from the checkpoint: after a move it names the old folder's file."""
    import shutil

    old, new = tmp_path / "old", tmp_path / "new"
    held_out = "data.holdout_fraction=0.5"  # 3 of the 6 training images validate, so a best checkpoint is kept
    train(compose("train", [*tiny_overrides(voc_root, old), "trainer.max_epochs=1", held_out]))
    shutil.move(old, new)
    # no validation after the resume: no new best, so Lightning's restored path (into old/) is what it reports
    overrides = [*tiny_overrides(voc_root, new), "trainer.max_epochs=2", "ckpt_path=last", held_out,
                 "+trainer.limit_val_batches=0", "optimized_metric=null"]  # fmt: skip
    train(compose("train", overrides))
    summary = json.loads((new / "metrics.json").read_text())
    assert summary["global_step"] == 2 and summary["resumed_from"] == str(new / "checkpoints" / "last.ckpt")
    assert summary["best_checkpoint"] == str(new / "checkpoints" / "best-epoch000.ckpt")  # not old/...: gone
    assert Path(summary["last_checkpoint"]).is_file()


def test_resuming_a_finished_run_without_more_epochs_says_how_to_train_on(voc_root, tmp_path):
    train(compose("train", [*tiny_overrides(voc_root, tmp_path), "trainer.max_epochs=1"]))
    with pytest.raises(ConfigError, match=r"already trained its 1 epoch\(s\) \(trainer\.max_epochs=1\); pass a larger"):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path), "trainer.max_epochs=1", "ckpt_path=last"]))
