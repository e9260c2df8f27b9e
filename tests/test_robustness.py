"""Nothing lost, ever (issue 27): one process per run or output folder, history kept on resume, user files kept by
`overwrite=true`, signals answered between images, loader workers that die with their parent, one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ranprm.cli.config import compose
from ranprm.cli.run_dir import LOCK_FILE, hold_folder
from ranprm.errors import FolderBusyError
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}

_HOLDER = """
import sys
from pathlib import Path
from ranprm.cli.run_dir import hold_folder
with hold_folder(Path(sys.argv[1]), "output"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def _holding(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` as a ranprm command does, until its stdin is closed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


# --- 1. one process per folder ------------------------------------------------------------------------------------


def test_a_second_training_into_a_held_run_folder_refuses_naming_the_holder_and_touches_nothing(voc_root, tmp_path):
    from ranprm.train import train

    run = tmp_path / "run"
    holder = _holding(run)
    try:
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        with pytest.raises(FolderBusyError) as info:
            train(compose("train", tiny_overrides(voc_root, run)))
        assert str(info.value).startswith(f"hydra.run.dir={run} is in use by another ranprm process (pid {holder.pid} ")
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before == [Path(LOCK_FILE)]
    finally:
        _release(holder)
    assert not run.exists()  # the holder created the folder, and removed it empty with its lock


def test_the_lock_is_free_again_after_the_holder_ends_and_nested_holds_take_no_second_lock(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with hold_folder(folder, "output"), hold_folder(folder, "output"):
        assert (folder / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()  # a folder it did not create stays
    _release(_holding(folder))


def test_a_folder_path_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    from ranprm.errors import RunFolderError

    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(RunFolderError, match=r"output='.*file' is a file; give a folder"),
        hold_folder(tmp_path / "file", "output"),
    ):
        pass
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(RunFolderError, match=r"is not writable"), hold_folder(locked / "run", "hydra.run.dir"):
            pass
    finally:
        locked.chmod(0o700)


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_folder_one_refuses_the_first_keeps_its_record(voc_root, tmp_path):
    run = tmp_path / "run"
    base = [sys.executable, "-m", "ranprm.train", *tiny_overrides(voc_root, run)[:-1], f"hydra.run.dir={run}"]
    first = subprocess.Popen([*base, "trainer.max_epochs=400", "seed=1"], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / LOCK_FILE).is_file() or "pid" not in (run / LOCK_FILE).read_text():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run([*base, "seed=2"], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"is in use by another ranprm process (pid {first.pid} " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None  # the first run goes on
    finally:
        first.terminate()  # SIGTERM: it saves and stops
        first.wait(timeout=120)
    assert "seed=1" in (run / ".hydra" / "overrides.yaml").read_text()
    assert "seed=2" not in (run / ".hydra" / "overrides.yaml").read_text()
    assert not list(run.glob(".hydra-pending*"))


# --- 2. resume keeps every logger's history and a consistent lr schedule ------------------------------------------


def test_resume_with_more_epochs_keeps_every_loggers_history_and_the_lr_goes_on_down(voc_root, tmp_path):
    import csv

    from ranprm.train import train
    from tests.test_loggers import _tensorboard_scalars

    pytest.importorskip("tensorboard")
    base = [*tiny_overrides(voc_root, tmp_path), "optimizer=adam", "optimizer.scheduler=cosine",
            "trainer.log_every_n_steps=1", "logger=[csv,tensorboard]"]  # fmt: skip
    train(compose("train", [*base, "trainer.max_epochs=2"]))
    first = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    train(compose("train", [*base, "trainer.max_epochs=4", "ckpt_path=last"]))
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert rows[: len(first)] == [{**r, **{k: "" for k in rows[0] if k not in r}} for r in first]
    assert {r["epoch"] for r in rows if r.get("epoch")} == {"0", "1", "2", "3"}  # 2 steps per epoch
    lr_key = next(k for k in rows[0] if k.startswith("lr-"))
    lrs = [(int(r["step"]), float(r[lr_key])) for r in rows if r.get(lr_key)]
    assert [s for s, _ in lrs] == list(range(8))
    # steps 0-3: the 4-step cosine, 0 at its end; steps 4-7: the 8-step cosine of the longer run, never back up
    expected = [(1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)] + [
        (1 + math.cos(math.pi * s / 8)) / 2 for s in range(4, 8)
    ]
    assert [v / 1e-3 for _, v in lrs] == pytest.approx(expected, abs=1e-9)  # conf/optimizer/adam.yaml: lr 1e-3
    # TensorBoard beside it: one event file per start in the same folder, together the same 8 steps of lr
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [s for s, _ in _tensorboard_scalars(tmp_path / "tensorboard")[lr_key]] == list(range(8))


# --- 5. loader workers die with the main process ------------------------------------------------------------------

_PARENT = """
import sys, time
from pathlib import Path
from torch.utils.data import DataLoader, Dataset
from ranprm.data.sampling import worker_init

class Forever(Dataset):
    def __len__(self):
        return 1
    def __getitem__(self, i):
        import os
        Path(sys.argv[1]).write_text(str(os.getpid()))
        time.sleep(3600)

next(iter(DataLoader(Forever(), num_workers=1, worker_init_fn=worker_init)))
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie nobody reaps (a container's init) is dead too


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_loader_worker_dies_when_its_main_process_is_sigkilled(tmp_path):
    pid_file = tmp_path / "worker.pid"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(pid_file)], env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert not _gone(worker)
    finally:
        parent.kill()  # SIGKILL: no handler, no cleanup of its own
        parent.wait()
    deadline = time.monotonic() + 60  # a bound for a loaded CI machine, not a speed target: it dies at once
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert _gone(worker)
    finally:
        if not _gone(worker):  # a failing run must not leave the orphan behind either
            os.kill(worker, signal.SIGKILL)


# --- 4. signals answered between images ---------------------------------------------------------------------------


def test_stop_signals_are_recorded_raised_at_the_next_check_and_the_old_handlers_come_back():
    from ranprm.utils.stop import StopRequested, check_stop, stop_on_signals

    before = signal.getsignal(signal.SIGHUP)
    with stop_on_signals():
        check_stop()  # nothing received: goes on
        os.kill(os.getpid(), signal.SIGHUP)  # a closed terminal: recorded, the process lives on
        with pytest.raises(StopRequested) as info:
            check_stop()
    assert (info.value.signal_name, info.value.exit_code) == ("SIGHUP", 129)
    assert signal.getsignal(signal.SIGHUP) == before
    check_stop()  # outside: nothing recorded any more


def _signal_at_first_retrieval(monkeypatch, signum: int) -> list[int]:
    """Send `signum` to this process while the first image's instances are retrieved; returns the per-image calls."""
    import ranprm.prm.pipeline as pipeline

    calls: list[int] = []
    real = pipeline.retrieve_instances

    def retrieve(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "retrieve_instances", retrieve)
    return calls


def test_ctrl_c_in_validations_instance_evaluation_stops_at_the_next_image_saves_and_hints(
    voc_root, tmp_path, monkeypatch
):
    from ranprm.errors import RunInterrupted
    from ranprm.train import train

    # What SIGINT did before the run: Python's KeyboardInterrupt in a terminal, but SIG_IGN when pytest was started
    # in the background by a shell without job control (`make test &`), which its children inherit.
    before = signal.getsignal(signal.SIGINT)
    calls = _signal_at_first_retrieval(monkeypatch, signal.SIGINT)
    overrides = [*tiny_overrides(voc_root, tmp_path), "trainer.max_epochs=1", "data.val_batch_size=4"]
    with pytest.raises(RunInterrupted) as info:
        train(compose("train", overrides))
    assert len(calls) == 1  # the batch holds 2 images: the second was never processed
    assert info.value.exit_code == 130 and info.value.signal_name == "SIGINT"
    assert f"continue with `ranprm-train resume={tmp_path}`" in str(info.value)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    record = json.loads((tmp_path / "interrupted.json").read_text())
    assert record["signal"] == "SIGINT" and record["checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "metrics.json").exists()
    # the signal handlers are the process's own again: a later command in this process starts clean
    assert signal.getsignal(signal.SIGINT) == before


def test_sigterm_to_evaluate_stops_between_images_and_is_not_swallowed(voc_root, tmp_path, monkeypatch):
    from ranprm.evaluate import evaluate
    from ranprm.train import train
    from ranprm.utils.stop import StopRequested

    train(compose("train", [*tiny_overrides(voc_root, tmp_path / "run"), "trainer.max_epochs=1"]))
    calls = _signal_at_first_retrieval(monkeypatch, signal.SIGTERM)
    out = tmp_path / "eval"
    cfg = compose("evaluate", ["data=voc", f"data.root={voc_root}", "data.class_names=[square,disk]",
                               "data.image_size=64", "data.val_batch_size=2", "device=cpu", "progress_bar=none",
                               f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"output={out}"])  # fmt: skip
    with pytest.raises(StopRequested) as info:
        evaluate(cfg)
    assert info.value.exit_code == 143 and len(calls) == 1
    assert not (out / "metrics.json").exists()


# --- 6. one line instead of a traceback ---------------------------------------------------------------------------


def test_a_class_mask_value_outside_the_classes_is_one_line_naming_file_and_value_before_training(voc_root, tmp_path):
    import numpy as np
    from PIL import Image

    from ranprm.errors import DataError
    from ranprm.train import train

    path = voc_root / "SegmentationClass" / "2024_000007.png"  # a validation image (the last quarter of the ids)
    png = Image.open(path)
    values = np.array(png)
    values[30, 30] = 42
    bad = Image.fromarray(values, mode="P")
    bad.putpalette(png.getpalette())
    bad.save(path)
    with pytest.raises(DataError) as info:
        train(compose("train", tiny_overrides(voc_root, tmp_path / "run")))
    assert str(info.value).startswith(f"mask {path} holds class value 42; with 2 classes in data.class_names")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_a_holdout_fraction_that_empties_the_training_split_is_one_line(voc_root, tmp_path):
    from ranprm.errors import ConfigError
    from ranprm.train import train

    with pytest.raises(ConfigError, match=r"data.holdout_fraction=0.95 holds out all 6 training images of Main/train"):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path / "run"), "data.holdout_fraction=0.95"]))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# --- 8. smaller ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_as_viewers_show_the_photo(tmp_path, fmt):
    import numpy as np
    from PIL import Image

    from ranprm.data.voc import image_size_of, read_image

    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored; a red band on the stored left
    stored[:, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge becomes the top
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(stored).save(path, format=fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    image = read_image(path)
    assert tuple(image.shape) == (3, 40, 20) and image_size_of(path) == (40, 20)
    assert image[0, :8].float().mean() > 200 and image[0, 12:].float().mean() < 50  # red on top, as shown


def test_a_quoted_resume_path_loses_its_quotes_and_a_family_change_names_both_backbones(tmp_path):
    from omegaconf import OmegaConf

    from ranprm.cli.resume import check_checkpoint_matches, expand_resume_argv
    from ranprm.errors import ConfigError

    run = tmp_path / "my runs" / "x"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["backbone=tiny"]))
    for quote in ("'", '"'):
        argv = expand_resume_argv(["ranprm-train", f"resume={quote}{run}{quote}"])
        assert argv[1] == "backbone=tiny" and argv[-1] == "ckpt_path=last", argv
    saved = {"backbone": {"name": "ran", "attention": []}}
    current = {"backbone": {"name": "resnet50", "width": 16}}
    with pytest.raises(ConfigError, match=r"trained with backbone.name='ran', this run sets 'resnet50'"):
        check_checkpoint_matches(saved, current, Path("last.ckpt"))


def test_third_party_noise_is_silenced_by_source_and_text_only(caplog):
    import logging
    import warnings

    from ranprm.cli.config import silence_third_party_noise

    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org/)"
    pytree = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        silence_third_party_noise()
        rank_zero.info(tip)
        rank_zero.info("GPU available: False, used: False")  # kept: says something about the run
        warnings.warn_explicit(pytree, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(pytree, FutureWarning, "mine.py", 1, module="mylab.code")  # kept: not Lightning's
    assert [r.getMessage() for r in caplog.records if r.name == rank_zero.name] == ["GPU available: False, used: False"]
    assert [str(w.message) for w in caught] == [pytree]


def test_an_error_in_a_loader_worker_is_its_own_line_without_the_workers_traceback(capsys):
    from torch._utils import ExceptionWrapper

    from ranprm.cli.config import report_user_errors
    from ranprm.errors import DataError

    def load() -> None:  # what the main process sees when a worker's read_image refused a corrupt JPEG
        try:
            raise DataError("image /data/JPEGImages/x.jpg is truncated or corrupt (broken data stream)")
        except DataError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    with pytest.raises(SystemExit) as info:
        report_user_errors(load)()
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "ranprm: error: image /data/JPEGImages/x.jpg is truncated or corrupt (broken data stream)\n"
    )


# --- 7. configuration ---------------------------------------------------------------------------------------------


def test_a_refused_attempt_in_a_fresh_folder_leaves_no_folder_behind(tmp_path):
    from ranprm.cli.run_dir import hydra_files_guard, staging_dir
    from ranprm.errors import ConfigError

    run = tmp_path / "outputs" / "evaluate" / "now"
    run.mkdir(parents=True)  # what Hydra makes before the task runs: the folder, its log and the staged record
    (run / "evaluate.log").touch()
    staging_dir(run).mkdir()
    (staging_dir(run) / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError), hydra_files_guard(run):
        raise ConfigError("data.image_size=-3 must be at least 32")
    assert not run.exists()


def test_limit_train_batches_0_is_refused_before_anything_is_written(voc_root, tmp_path):
    from ranprm.errors import ConfigError
    from ranprm.train import train

    with pytest.raises(ConfigError, match=r"trainer.limit_train_batches=0 trains nothing"):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path / "run"), "++trainer.limit_train_batches=0"]))
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["logger=csv", "+logger.bogus=1"], "logger.bogus is not an option of logger; its options: wandb, csv, "
         "tensorboard (logger=[csv,tensorboard] picks several) and extra (+logger.extra.<name>._target_="
         "lightning.pytorch.loggers.MLFlowLogger)"),
        (["logger=csv", "+logger.csv.bogus=1"],
         "logger.csv.bogus is not an option of logger=csv; its options: enabled"),
        (["logger=[csv,tensorboard]", "+logger.tensorboard.save_dir=/x"],
         "logger.tensorboard.save_dir is not an option of logger=tensorboard; its options: enabled"),
        (["logger=wandb", "logger.wandb.projct=x"], "logger.wandb.projct is not an option of logger=wandb; its "
         "options: enabled, project, entity, run_name, group, job_type, mode, log_model"),
        # the spelling of one logger per run: Hydra refuses it while composing, the line says the new one
        (["logger=wandb", "logger.project=x"], "logger.project is not an option of logger; each logger's settings "
         "are under its name: logger.wandb.project=..."),
        (["logger=tensorboard", "+logger.save_dir=/x"], "logger.save_dir is not an option of logger; its options: "),
        (["logger=csv", "logger.wandb.project=x"], "logger.wandb: logger=wandb is not chosen in this run; add it "
         "(e.g. logger=[csv,wandb]), or set its keys with +logger.wandb.<key>=..."),
        (["logger=csv", "logger.csv.enabled=maybe"], "logger.csv.enabled='maybe' must be true or false"),
    ],
)  # fmt: skip
def test_unknown_keys_under_logger_are_refused_like_everywhere_else(overrides, message):
    from ranprm.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        compose("train", overrides)  # the entry points check the same (`check_composed`) before the task runs
    assert str(caught.value).startswith(message)
    assert compose("train", ["logger=wandb", "logger.wandb.project=mine"]).logger.wandb.project == "mine"


def test_ranprm_log_dir_naming_a_file_is_one_line_before_anything_is_made(tmp_path):
    """$RANPRM_LOG_DIR holds the run folders; a file there ended in Hydra's traceback from its mkdir."""
    in_the_way = tmp_path / "runs"
    in_the_way.write_text("a file, not a folder\n")
    proc = subprocess.run([sys.executable, "-m", "ranprm.train", "experiment=smoke"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=240, env={**ENV, "RANPRM_LOG_DIR": str(in_the_way)})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"ranprm: error: RANPRM_LOG_DIR='{in_the_way}' is a file; give a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no run folder, log or .hydra anywhere
    assert in_the_way.read_text() == "a file, not a folder\n"


def test_a_sweep_under_a_ranprm_log_dir_below_a_file_is_refused_by_the_same_check(tmp_path, monkeypatch, capsys):
    """The Hydra callback checks a multirun's sweep folder as it checks a run folder (here without a subprocess)."""
    from omegaconf import OmegaConf

    from ranprm.cli.run_dir import RunFolderCheck

    (tmp_path / "runs").write_text("")
    monkeypatch.setenv("RANPRM_LOG_DIR", str(tmp_path / "runs" / "deeper"))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "runs" / "deeper" / "multirun" / "x")}}})
    with pytest.raises(SystemExit) as exited:
        RunFolderCheck().on_multirun_start(config)
    assert exited.value.code == 2
    deeper = tmp_path / "runs" / "deeper"
    assert capsys.readouterr().err.strip() == (
        f"ranprm: error: RANPRM_LOG_DIR='{deeper}' is not writable (Not a directory); choose another folder or free it"
    )
    monkeypatch.delenv("RANPRM_LOG_DIR")
    RunFolderCheck().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # checked, and nothing left behind


def test_a_sweep_job_run_again_into_its_folder_is_skipped_when_finished_and_resumed_when_interrupted(tmp_path):
    from ranprm.cli.run_dir import plan_training_folder

    job = tmp_path / "sweep" / "0"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (job / "interrupted.json").write_text("{}")
    assert plan_training_folder(job, None, False, continue_job=True).resume == job / "checkpoints" / "last.ckpt"
    (job / "interrupted.json").unlink()
    (job / "metrics.json").write_text("{}")
    assert plan_training_folder(job, None, False, continue_job=True).finished
    assert plan_training_folder(job, None, True, continue_job=True).remove  # overwrite=true: runs it again


def test_symlink_loops_and_dangling_links_in_a_predict_folder_are_counted_and_named(tmp_path, caplog):
    import logging

    from PIL import Image

    from ranprm.data.images import list_images

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")  # a link to itself: a loop
    (tmp_path / "gone.png").symlink_to(tmp_path / "nothing.png")
    with caplog.at_level(logging.WARNING, logger="ranprm.data.images"):
        assert list_images(tmp_path) == [tmp_path / "a.jpg"]
    assert "skipped 2 image name(s) that are not readable files" in caplog.text
    assert "gone.png, loop.jpg" in caplog.text
