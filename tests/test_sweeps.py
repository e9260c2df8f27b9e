"""Sweeps, presets and scale-out configs: composition, the multirun summary, failed jobs, DDP on 2 CPU processes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ranprm.cli.config import compose
from ranprm.cli.sweep import SweepSummary, collect, record_failure, write_summary
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "ranprm.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _sweep_overrides(voc_root: Path, sweep_dir: Path) -> list[str]:
    # paths.output_dir stays Hydra's job folder; one epoch keeps a job at a few seconds
    base = [o for o in tiny_overrides(voc_root, sweep_dir) if not o.startswith("paths.")]
    return [*base, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep_dir}"]


# ---------------------------------------------------------------------------------------------- composition


def test_seed_voc_preset_is_the_ran_prm_papers_setup():
    cfg = compose("train", ["experiment=seed_voc", "data.root=/data/VOC2012", "paths.output_dir=/tmp/x"])
    assert cfg.data.name == "voc" and cfg.data.train_split == "train"
    assert (cfg.data.train_fraction, cfg.data.holdout_fraction) == (0.2, 0.1)
    assert (cfg.data.image_size, cfg.data.flip_prob, cfg.data.batch_size) == (448, 0.5, 8)
    assert cfg.optimizer.name == "sgd"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.01, 0.9, 1e-4)
    assert cfg.trainer.max_epochs == 4
    assert cfg.backbone.name == "ran" and cfg.threshold.name == "seed"  # Q3 for classes, the mean for peaks


def test_prm_voc_preset_is_the_original_prm():
    cfg = compose("train", ["experiment=prm_voc", "data.root=/data/VOC2012", "paths.output_dir=/tmp/x"])
    assert cfg.backbone.name == "resnet50" and cfg.backbone.pretrained == "imagenet"
    assert cfg.optimizer.backbone_lr_mult == 0.01 and cfg.optimizer.lr == 0.01
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.data.image_size) == (16, 20, 448)
    assert cfg.threshold.name == "fixed"
    assert cfg.threshold.peaks.strict is True  # the official `peak_val > 30`
    assert (cfg.retrieval.name, cfg.retrieval.size) == ("proposals", 448)  # the official retrieval at 448 x 448
    # the official config trains on Main/trainval (which holds Segmentation val's images, labels only)
    assert cfg.data.val_task == "Segmentation" and cfg.data.train_split == "trainval"


def test_a_preset_still_takes_command_line_overrides():
    cfg = compose("train", ["experiment=seed_voc", "data.root=/d", "trainer.max_epochs=1", "threshold=q3"])
    assert cfg.trainer.max_epochs == 1 and cfg.threshold.name == "q3"


def test_ddp_trainer_composes():
    cfg = compose("train", ["trainer=ddp", "paths.output_dir=/tmp/x"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == "auto"
    assert cfg.trainer.inference_mode is False  # inherited from trainer/default


def test_optuna_search_composes_and_searches_lr_and_wd_only():
    cfg = compose("train", ["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower()
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # a search is a multirun with or without -m
    assert sweeper.direction == "maximize"
    assert sweeper.n_trials > 0
    params = sweeper.params
    assert params["optimizer.lr"].startswith("tag(log, interval(")
    assert "optimizer.weight_decay" in params
    # only what moves val/cls_map: inference settings (threshold, retrieval) cannot, so they are not searched
    assert set(params) == {"optimizer.lr", "optimizer.weight_decay"}
    assert cfg.optimized_metric == "val/cls_map"


def test_optuna_search_space_parses():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = compose("train", ["hparams_search=optuna"], return_hydra_config=True)
    parser = OverridesParser.create()
    for key, value in cfg.hydra.sweeper.params.items():
        override = parser.parse_override(f"{key}={value}")
        assert create_optuna_distribution_from_override(override) is not None, key


def test_slurm_launcher_composes_and_validates():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = compose(
        "train",
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/tmp/sweep"],
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    # validates against the plugin's structured config (types and key names)
    resolved = OmegaConf.to_container(launcher, resolve=True)
    merged = OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), resolved)
    assert merged.submitit_folder == "/tmp/sweep/.submitit/%j"
    assert merged.timeout_min > 0


def test_summary_callback_is_registered():
    cfg = compose("train", [], return_hydra_config=True)
    assert cfg.hydra.callbacks.sweep_summary._target_ == "ranprm.cli.sweep.SweepSummary"


# ----------------------------------------------------------------------------------------- summary (no training)


def _fake_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None, error: Exception | None = None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if metrics is not None:
        summary = {"metrics": metrics, "instance_metrics": {"map_r_50": 0.5, "abo": 0.4}, "wall_s": 1.0}
        (job / "metrics.json").write_text(json.dumps(summary))
    if error is not None:
        record_failure(job, error, overrides)
    return job


def test_summary_lists_ok_failed_and_missing_jobs(tmp_path):
    _fake_job(tmp_path, 0, ["threshold=mean"], {"val/cls_map": 0.75})
    _fake_job(tmp_path, 1, ["threshold=q3"], None, error=ValueError("boom | bad"))
    _fake_job(tmp_path, 2, ["threshold=fixed"], None)
    _fake_job(tmp_path, 10, ["threshold=median"], {"val/cls_map": 0.5})
    rows = collect(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["ok", "failed", "missing", "ok"]
    assert rows[0]["val/cls_map"] == 0.75 and rows[0]["instance/map_r_50"] == 0.5
    assert "ValueError: boom" in rows[1]["error"]

    with pytest.raises(SystemExit) as info:  # a sweep with failed or missing jobs exits 1, after its summary
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert info.value.code == 1
    with (tmp_path / "summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["status"] for r in table] == ["ok", "failed", "missing", "ok"]
    md = (tmp_path / "summary.md").read_text()
    assert "4 jobs, 2 ok, 2 failed or missing" in md
    assert "boom \\| bad" in md  # a pipe in an error does not break the table


def test_summary_has_the_metrics_of_evaluate_sweeps(tmp_path):
    """`ranprm-evaluate -m` jobs: the evaluation's own metrics; with variants=, the best variant and each one's
    ranked metric."""
    plain = tmp_path / "0"
    plain.mkdir()
    record = {"mode": "ckpt", "map_r_50": 0.25, "abo": 0.5, "num_images": 3, "metric_names": ["map_r_50", "abo"]}
    (plain / "metrics.json").write_text(json.dumps(record))
    ranked = tmp_path / "1"
    ranked.mkdir()
    variants = [{"name": "q3/proposals", "metrics": {"abo": 0.7}}, {"name": "seed/prm_only", "metrics": {"abo": 0.6}}]
    (ranked / "metrics.json").write_text(json.dumps({"mode": "ckpt", "ranked_by": "abo", "variants": variants}))
    rows = collect(tmp_path)
    assert (rows[0]["map_r_50"], rows[0]["abo"]) == (0.25, 0.5) and "num_images" not in rows[0]
    assert rows[1]["best_variant"] == "q3/proposals"
    assert (rows[1]["q3/proposals/abo"], rows[1]["seed/prm_only/abo"]) == (0.7, 0.6)
    _, md_path = write_summary(tmp_path)
    assert "| map_r_50 |" in md_path.read_text().replace("abo | ", "")


def test_summary_of_an_empty_sweep_is_written(tmp_path):
    csv_path, md_path = write_summary(tmp_path)
    assert csv_path.read_text().startswith("job,status,overrides")
    assert "0 jobs" in md_path.read_text()


# -------------------------------------------------------------------------------------- end to end (subprocess)


@pytest.mark.slow
def test_multirun_writes_job_folders_and_summary(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", *_sweep_overrides(voc_root, sweep), "threshold=mean,q3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num, threshold in enumerate(["mean", "q3"]):
        summary = json.loads((sweep / str(num) / "metrics.json").read_text())
        assert summary["threshold"] == threshold
        assert "val/cls_map" in summary["metrics"]
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "threshold=mean" in rows[0]["overrides"] and "threshold=q3" in rows[1]["overrides"]
    assert float(rows[0]["val/cls_map"]) >= 0.0
    assert "2 jobs, 2 ok" in (sweep / "summary.md").read_text()


@pytest.mark.slow
def test_optuna_search_is_a_multirun_without_dash_m(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run([*_sweep_overrides(voc_root, sweep), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.sampler.n_startup_trials=2"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1" / "metrics.json").is_file()
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.name == "optuna" and "optimizer.lr" in results.best_params


@pytest.mark.slow
def test_one_failed_job_does_not_stop_the_sweep(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(["-m", *_sweep_overrides(voc_root, sweep), "data.train_fraction=5.0,1.0"])
    assert proc.returncode == 1, proc.stderr[-3000:]  # the other job ran, but the sweep did not do all it was asked
    assert proc.stderr.strip().splitlines()[-1] == (
        f"ranprm: error: 1 of 2 jobs failed or are missing (0); see {sweep / 'summary.md'}"
    )
    failure = json.loads((sweep / "0" / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError" and "train_fraction" in failure["error"]
    assert "data.train_fraction=5.0" in failure["overrides"]
    assert not (sweep / "0" / "metrics.json").exists()
    assert (sweep / "1" / "metrics.json").is_file()
    with (sweep / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "ConfigError" in rows[0]["error"]


@pytest.mark.slow
def test_single_run_failure_still_exits_with_an_error(voc_root, tmp_path):
    out = tmp_path / "run"
    proc = _run([*tiny_overrides(voc_root, out), "data.train_fraction=5.0"])
    assert proc.returncode == 2
    assert "train_fraction" in proc.stderr
    assert not (out / "failed.json").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(voc_root, tmp_path):
    out = tmp_path / "ddp"
    args = [o for o in tiny_overrides(voc_root, out) if not o.startswith(("trainer=", "paths."))]
    proc = _run(
        [
            *args,
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            f"hydra.run.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0" in log and "GLOBAL_RANK: 1" in log, log[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    # 6 training images split over 2 ranks: 3 per rank, batch 4 -> 1 step per epoch, 2 epochs
    assert summary["global_step"] == 2
    assert summary["epochs"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.suffix == ".ckpt")[-1] == "last.ckpt"
    assert list(out.glob("**/checkpoints")) == [out / "checkpoints"]
