"""Loggers: W&B offline without a key, images in the offline run, and no W&B failure ever stops training."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

import ranprm.lightning.loggers as loggers_mod
import ranprm.train as train_mod
from ranprm.cli.config import compose
from ranprm.errors import ConfigError
from ranprm.lightning.loggers import (
    RunIdentity,
    build_loggers,
    run_identity,
    run_name,
    sweep_group,
    wandb_has_credentials,
)
from ranprm.train import train
from tests.helpers import CLASSES
from tests.test_train import tiny_overrides
from tests.wandb_records import history, offline_runs, records_of_type, run_record

REPO = Path(__file__).resolve().parents[1]

VAL_IDS = ["2024_000006", "2024_000007"]


@pytest.fixture(autouse=True)
def _finish_wandb():
    """A run left open by one test would be reused by the next WandbLogger (Lightning takes `wandb.run`)."""
    yield
    import wandb

    wandb.finish()


@pytest.fixture
def no_wandb_key(tmp_path, monkeypatch):
    """No API key anywhere: no environment variable, and a HOME with no ~/.netrc."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return home


def wandb_overrides(voc_root: Path, out: Path, epochs: int = 1) -> list[str]:
    return [
        *tiny_overrides(voc_root, out),
        f"trainer.max_epochs={epochs}",
        "logger=wandb",
        "callbacks.panels.num_images=2",
    ]


def test_no_credentials_without_env_or_netrc(no_wandb_key):
    assert not wandb_has_credentials()


def test_credentials_from_env(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_has_credentials()


def test_credentials_from_netrc(no_wandb_key):
    netrc = no_wandb_key / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_has_credentials()


class _WandbThatCannotStart:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("no service")


@pytest.mark.parametrize(
    ("others", "said"),
    [
        ({}, "W&B could not start (RuntimeError: no service)"),
        # beside CSV, the fallback would be a second CSV logger writing the same csv/metrics.csv
        ({"csv": {"enabled": True}}, "W&B could not start (RuntimeError: no service); logging to the CSV logger only"),
    ],
)
def test_build_logger_falls_back_to_one_csv_logger_when_wandb_init_raises(tmp_path, monkeypatch, caplog, others, said):
    monkeypatch.setattr(loggers_mod, "SafeWandbLogger", _WandbThatCannotStart)
    with caplog.at_level(logging.WARNING, logger="ranprm.lightning.loggers"):
        (logger,) = build_loggers({"wandb": {"enabled": True, "mode": "offline"}, **others}, tmp_path)
    assert isinstance(logger, CSVLogger)
    assert said in caplog.text


def test_build_logger_falls_back_to_csv_when_the_run_cannot_start(tmp_path, monkeypatch, caplog):
    class NoRun(loggers_mod.SafeWandbLogger):
        @property
        def experiment(self):
            raise OSError("wandb service did not start")

    monkeypatch.setattr(loggers_mod, "SafeWandbLogger", NoRun)
    with caplog.at_level(logging.WARNING, logger="ranprm.lightning.loggers"):
        (logger,) = build_loggers({"wandb": {"enabled": True, "mode": "disabled"}}, tmp_path)
    assert isinstance(logger, CSVLogger)
    assert "wandb service did not start" in caplog.text


def test_a_raising_wandb_logger_does_not_stop_training(voc_root, tmp_path, monkeypatch, caplog):
    """WANDB_MODE=disabled (conftest) gives a real WandbLogger; its image and metric logging then raise.

    Each failure is a warning (once per kind of call), and the panels still reach the disk.
    """
    calls = {"log_image": 0, "log_metrics": 0}

    def raiser(name):
        def raise_(self, *args, **kwargs):
            calls[name] += 1
            raise RuntimeError(f"{name} failed")

        return raise_

    monkeypatch.setattr(WandbLogger, "log_image", raiser("log_image"))
    monkeypatch.setattr(WandbLogger, "log_metrics", raiser("log_metrics"))
    with caplog.at_level(logging.WARNING):
        value = train(compose("train", wandb_overrides(voc_root, tmp_path, epochs=2)))
    assert value is not None and 0.0 <= value <= 1.0
    assert calls["log_image"] == 2 and calls["log_metrics"] > 0  # it really went through the raising paths
    for epoch in (0, 1):
        assert sorted(p.name for p in (tmp_path / "panels" / f"epoch_{epoch:03d}").glob("*.png")) == [
            f"{i}.png" for i in VAL_IDS
        ]
    assert "W&B log_image failed (RuntimeError: log_image failed)" in caplog.text
    assert "W&B log_metrics failed (RuntimeError: log_metrics failed)" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("W&B log_metrics failed" in m for m in warnings) == 1  # not one warning per step
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_offline_wandb_run_holds_the_logged_panel_images(voc_root, tmp_path, monkeypatch, no_wandb_key):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    built = []
    original = train_mod.build_loggers

    def recording_build_loggers(*args, **kwargs):
        built.extend(original(*args, **kwargs))
        return built

    monkeypatch.setattr(train_mod, "build_loggers", recording_build_loggers)
    try:
        train(compose("train", wandb_overrides(voc_root, tmp_path, epochs=1)))
    finally:
        wandb.finish()  # flushes the offline run to disk
    if not isinstance(built[0], WandbLogger):
        pytest.skip(f"wandb could not start an offline run in this sandbox (got {type(built[0]).__name__})")
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1, os.listdir(tmp_path)
    images = sorted((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(images) == len(VAL_IDS)  # one logged image per panel of the single epoch
    # W&B got the PNG files on disk themselves (copied, not re-encoded from arrays: that cost 10x the time).
    on_disk = sorted((tmp_path / "panels" / "epoch_000").glob("*.png"))
    assert sorted(p.read_bytes() for p in images) == sorted(p.read_bytes() for p in on_disk)
    assert any(runs[0].glob("*.wandb"))  # the run's record, for `wandb sync`


# ------------------------------------------------------------------------------ one W&B run per job, named, grouped


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch, no_wandb_key):
    """W&B offline (as for a user without a key), with every W&B folder inside the test's tmp_path."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / f"wandb-{sub}"))
    return tmp_path


def test_run_name_comes_from_the_overrides_without_the_paths():
    overrides = ["backbone=ran", "data.root=/data/VOC2012", "threshold=q3", "paths.output_dir=/x", "+trainer.foo=1",
                 "hydra.run.dir=/r", "logger=wandb", "tags=[a]", "data.num_workers=0", "seed=1"]  # fmt: skip
    # group choices and top-level keys first (what a sweep varies), dotted keys after, in command-line order
    assert run_name(overrides) == "backbone=ran,threshold=q3,seed=1,trainer.foo=1"
    assert run_name(["data.root=/d", "paths.data_dir=/e"]) is None  # the defaults: W&B picks a name
    long = run_name([f"optimizer.lr={i}" for i in range(40)])
    assert long is not None and len(long) == 128 and long.endswith("...")


def test_sweep_group_is_the_sweep_folder():
    assert sweep_group("multirun/train/2026-01-01/12-00-00-000001") == "multirun/train/2026-01-01/12-00-00-000001"
    assert sweep_group(None) is None
    deep = sweep_group("/" + "d" * 200)
    assert deep is not None and len(deep) == 128 and deep.startswith("...")
    identity = run_identity("evaluate", ["threshold=q3"], "/s", ["voc", 3])
    assert identity == RunIdentity(job_type="evaluate", name="threshold=q3", group="/s", tags=("voc", "3"))


def test_log_model_must_be_false_true_or_all(tmp_path):
    with pytest.raises(ConfigError, match="logger.wandb.log_model='best'"):
        build_loggers({"wandb": {"enabled": True, "mode": "disabled", "log_model": "best"}}, tmp_path)


def test_an_open_run_is_finished_before_a_new_logger_starts(offline_wandb):
    """Lightning's WandbLogger takes `wandb.run` when one is open: the next job would log into the last one's run."""
    import wandb

    leftover = wandb.init(project="ranprm", dir=str(offline_wandb), id="leftover1", mode="offline")
    identity = RunIdentity(name="threshold=q3")
    (logger,) = build_loggers({"wandb": {"enabled": True}}, offline_wandb / "job", identity=identity)
    assert isinstance(logger, WandbLogger)
    assert logger.experiment.id != "leftover1" and wandb.run is logger.experiment
    assert leftover._is_finished
    stored = (offline_wandb / "job" / "wandb_run_id").read_text().strip()
    assert logger.experiment.id == stored
    logger.finalize("success")
    assert wandb.run is None  # finalize finishes the job's run


def test_resumed_run_continues_its_wandb_run(voc_root, tmp_path, offline_wandb):
    """A run resumed in its folder (ckpt_path=last) logs into the same W&B run id as before."""
    run_dir = tmp_path / "run"
    first = [*wandb_overrides(voc_root, run_dir, epochs=1), "callbacks.panels.num_images=0"]
    train(compose("train", first))
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    train(compose("train", [*first, "trainer.max_epochs=2", "ckpt_path=last"]))
    runs = offline_runs(run_dir)
    assert len(runs) == 2  # one offline folder per start (wandb sync merges them), both with the same id
    assert [run_record(r).run_id for r in runs] == [run_id, run_id]
    # named offline-run-<second>-<id>; two starts within one second get a suffix after the id
    assert all(f"-{run_id}" in r.name for r in runs)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    steps = [row["trainer/global_step"] for row in history(runs[1]) if "trainer/global_step" in row]
    assert steps and min(steps) >= 2  # the second start goes on from the first's 2 steps, not from step 0


def test_checkpoints_become_artifacts_with_best_and_latest(voc_root, tmp_path, offline_wandb):
    """log_model=true: at the end, the best and the last checkpoint as versions of model-<run id>.

    mode=min on cls mAP makes epoch 0 the best and epoch 1 the last, so the aliases must land on different files.
    A best checkpoint is kept only with held-out validation images (never chosen on the evaluated split).
    """
    run_dir = tmp_path / "run"
    overrides = [*wandb_overrides(voc_root, run_dir, epochs=2), "callbacks.panels.num_images=0",
                 "data.holdout_fraction=0.5",
                 "logger.wandb.log_model=true", "callbacks.checkpoint.mode=min"]  # fmt: skip
    train(compose("train", overrides))
    (run,) = offline_runs(run_dir)
    run_id = run_record(run).run_id
    artifacts = records_of_type(run, "artifact")
    assert {a.name for a in artifacts} == {f"model-{run_id}"} and {a.type for a in artifacts} == {"model"}
    # W&B itself gives each newly logged version `latest`; the last one logged keeps it.
    files = [(json.loads(a.metadata)["original_filename"], set(a.aliases)) for a in artifacts]
    assert files == [("best-epoch000.ckpt", {"best", "latest"}), ("last.ckpt", {"latest"})]
    assert all([e.path for e in a.manifest.contents] == ["model.ckpt"] for a in artifacts)


def test_evaluate_logs_its_metrics_and_per_class_table_to_wandb(voc_root, tmp_path, offline_wandb):
    from ranprm.eval import write_results
    from ranprm.evaluate import evaluate
    from tests.test_evaluate import _data, _gt_results

    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    out = tmp_path / "eval"
    cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={out}",
                               f"paths.output_dir={out}", "logger=wandb", "tags=[gt]"])  # fmt: skip
    evaluate(cfg)
    (run,) = offline_runs(out)
    record = run_record(run)
    assert record.job_type == "evaluate" and list(record.tags) == ["gt"]
    logged = {key: value for row in history(run) for key, value in row.items()}
    assert logged["eval/map_r_50"] == pytest.approx(1.0)  # the ground truth scored against itself
    assert logged["eval/per_class._type"] == "table-file"
    table = json.loads(next(run.glob("files/media/table/eval/per_class_*.table.json")).read_text())
    assert table["columns"][0] == "class" and sorted(row[0] for row in table["data"]) == sorted(CLASSES)


def test_evaluate_logs_to_csv_too(voc_root, tmp_path):
    from ranprm.eval import write_results
    from ranprm.evaluate import evaluate
    from tests.test_evaluate import _data, _gt_results

    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    out = tmp_path / "eval"
    evaluate(compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={out}",
                                  f"paths.output_dir={out}", "logger=csv"]))  # fmt: skip
    with (out / "csv" / "metrics.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert float(row["eval/map_r_50"]) == pytest.approx(1.0) and float(row["eval/abo"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_a_local_sweep_leaves_one_wandb_run_per_job_in_one_group(voc_root, tmp_path, no_wandb_key):
    """The README's sweep with logger=wandb, offline: 3 jobs -> 3 W&B runs, one group, names from the overrides."""
    from tests.test_sweeps import _sweep_overrides

    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO),
               HOME=str(no_wandb_key), WANDB_CACHE_DIR=str(tmp_path / "wc"), WANDB_CONFIG_DIR=str(tmp_path / "wcf"),
               WANDB_DATA_DIR=str(tmp_path / "wd"))  # fmt: skip
    env.pop("WANDB_API_KEY", None)
    args = [o for o in _sweep_overrides(voc_root, sweep) if o != "logger=csv"]
    proc = subprocess.run(
        [sys.executable, "-m", "ranprm.train", "-m", *args, "logger=wandb", "callbacks.panels.num_images=0",
         "threshold=mean,median,q3", "tags=[sweep-test]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = []
    for num, threshold in enumerate(["mean", "median", "q3"]):
        (run,) = offline_runs(sweep / str(num))  # exactly one W&B run in each job's folder
        record = run_record(run)
        assert record.run_id == (sweep / str(num) / "wandb_run_id").read_text().strip()
        assert f"threshold={threshold}" in record.display_name
        records.append(record)
    assert len({r.run_id for r in records}) == 3
    assert {r.run_group for r in records} == {sweep.as_posix()}
    assert {r.job_type for r in records} == {"train"}
    assert all(list(r.tags) == ["sweep-test"] for r in records)


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder`: tag -> [(step, value)] in the order logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: keep every value
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def _csv_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every column of Lightning's metrics.csv but `step`: column -> [(step, value)] of its non-empty cells."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def test_csv_and_tensorboard_at_once_log_the_same_metrics(voc_root, tmp_path):
    """logger=[csv,tensorboard]: both loggers run (TensorBoard from the `tensorboard` extra, which `make` installs)
    and record the same metrics at the same steps."""
    pytest.importorskip("tensorboard")
    overrides = [*tiny_overrides(voc_root, tmp_path), "logger=[csv,tensorboard]", "trainer.max_epochs=1",
                 "trainer.log_every_n_steps=1", "callbacks.panels.num_images=0"]  # fmt: skip
    assert train(compose("train", overrides)) is not None
    from_csv = _csv_series(tmp_path / "csv" / "metrics.csv")
    from_tensorboard = _tensorboard_scalars(tmp_path / "tensorboard")
    # TensorBoard alone gets `hp_metric` (Lightning's placeholder for the hyperparameters tab, -1)
    assert from_tensorboard.pop("hp_metric") == [(0, -1.0)]
    assert {"train/loss", "val/cls_map", "epoch"} <= set(from_csv)
    assert sorted(from_tensorboard) == sorted(from_csv)
    for key, logged in from_csv.items():  # TensorBoard keeps float32: one rounding of each value
        assert [s for s, _ in from_tensorboard[key]] == [s for s, _ in logged], key
        assert [v for _, v in from_tensorboard[key]] == pytest.approx([v for _, v in logged], rel=2**-24), key


def test_several_loggers_are_built_in_the_config_order_and_settings_alone_turn_none_on(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from ranprm.cli.config import to_plain
    from ranprm.lightning.loggers import HistoryKeepingCSVLogger, enabled_loggers

    cfg = compose("train", ["logger=[tensorboard,csv]", "+logger.wandb.entity=my-team"])  # as conf/local may set it
    assert to_plain(cfg.logger) == {"tensorboard": {"enabled": True}, "csv": {"enabled": True},
                                    "wandb": {"entity": "my-team"}}  # fmt: skip
    assert enabled_loggers(to_plain(cfg.logger)) == ["tensorboard", "csv"]
    loggers = build_loggers(to_plain(cfg.logger), tmp_path)
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, HistoryKeepingCSVLogger]
    assert [Path(lg.log_dir) for lg in loggers] == [tmp_path / "tensorboard", tmp_path / "csv"]
    assert build_loggers(to_plain(compose("train", ["logger=none"]).logger), tmp_path) == []
    assert build_loggers(to_plain(compose("train", ["logger=csv", "logger.csv.enabled=false"]).logger), tmp_path) == []


def test_a_logger_of_any_class_joins_by_target(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from ranprm.cli.config import to_plain
    from ranprm.lightning.loggers import HistoryKeepingCSVLogger

    pytest.importorskip("tensorboard")
    extra = ["+logger.extra.board._target_=lightning.pytorch.loggers.TensorBoardLogger",
             f"+logger.extra.board.save_dir={tmp_path / 'mine'}", "+logger.extra.board.name=board"]  # fmt: skip
    cfg = compose("train", ["logger=csv", *extra])
    first, extra = build_loggers(to_plain(cfg.logger), tmp_path)
    assert type(first) is HistoryKeepingCSVLogger and type(extra) is TensorBoardLogger
    assert Path(extra.log_dir) == tmp_path / "mine" / "board" / "version_0"


def test_an_extra_logger_that_cannot_be_built_is_one_line(tmp_path):
    """MLFlowLogger imports without mlflow (the compose-time check passes) and refuses to start without it."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here: MLFlowLogger would start")
    extra = {"mlflow": {"_target_": "lightning.pytorch.loggers.MLFlowLogger", "save_dir": str(tmp_path)}}
    with pytest.raises(ConfigError) as caught:
        build_loggers({"csv": {"enabled": True}, "extra": extra}, tmp_path)
    assert str(caught.value).startswith("logger.extra.mlflow: lightning.pytorch.loggers.MLFlowLogger could not be "
                                        "built (ModuleNotFoundError: Requirement 'mlflow")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["+logger.extra.board._target_=lightning.pytorch.loggers.TensorBoardLogger"],
         "logger.extra.board: lightning.pytorch.loggers.TensorBoardLogger missing a required argument: 'save_dir'; "
         "give it as +logger.extra.board.<argument>=..."),
        (["+logger.extra.board._target_=lightning.pytorch.callbacks.EarlyStopping", "+logger.extra.board.monitor=x"],
         "logger.extra.board._target_=lightning.pytorch.callbacks.EarlyStopping is not a "
         "lightning.pytorch.loggers.logger.Logger"),
        (["+logger.extra.board.save_dir=/x"], "logger.extra.board needs a _target_ naming its class, e.g. "
         "+logger.extra.board._target_=lightning.pytorch.loggers.MLFlowLogger"),
    ],
)  # fmt: skip
def test_an_extra_logger_is_checked_at_compose_time_in_one_line(overrides, line):
    with pytest.raises(ConfigError) as caught:
        compose("train", overrides)
    assert str(caught.value) == line


def test_tensorboard_without_its_package_is_refused_when_the_config_is_composed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    missing = ("tensorboard", "tensorboardX")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ConfigError) as caught:
        compose("train", ["logger=[csv,tensorboard]"])
    assert str(caught.value) == "logger=tensorboard needs the tensorboard package: pip install 'ranprm[tensorboard]'"
    assert list(compose("train", ["logger=csv"]).logger) == ["csv"]  # the others are unaffected
