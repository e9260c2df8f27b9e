"""experiments/attention_prm: the cell runner (skip finished cells, the budget, interruptions, missing data) and the
report made from cells alone. One real cell of the smoke grid runs end to end in the slow test."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from experiments.attention_prm import runner
from experiments.attention_prm.__main__ import main
from experiments.attention_prm.analysis import encode, record_metrics, unpack_records
from experiments.attention_prm.grid import TRUNKS, Data, Grid, smoke_grid
from experiments.attention_prm.report import write_report
from ranprm.utils.io import write_json_atomic
from tests.test_study_analysis import perfect, tp_fp_tp

CLASS_NAMES = ("cat", "dog", "cow")


def _fake_cell(out: Path, cell_id: str, wall_s: float = 60.0, records: dict | None = None, variants=()) -> Path:
    """A finished cell's file as the runner writes it, with the same per-image records under every variant."""
    data, trunk, seed = cell_id.split("/")
    encoded = {
        image_id: {name: encode(rec) for name, rec in image.items()} for image_id, image in (records or {}).items()
    }
    metrics = record_metrics(list(records.values()), CLASS_NAMES) if records else {}
    cell = {"cell": cell_id, "data": data, "trunk": trunk, "seed": int(seed.removeprefix("seed")), "wall_s": wall_s,
            "class_names": list(CLASS_NAMES), "machine": {"cpu": "test CPU", "cores": 2},
            "variants": {v: {"metrics": metrics} for v in variants}, "coco": {},
            "records": {"shared": {}, "variants": dict.fromkeys(variants, encoded)}}  # fmt: skip
    path = out / "cells" / (cell_id.replace("/", "__") + ".json")
    write_json_atomic(path, cell)
    return path


def _no_training(monkeypatch) -> list:
    started = []
    monkeypatch.setattr(runner, "run_cell", lambda grid, cell, *a, **k: started.append(cell.id) or {"wall_s": 1.0})
    return started


def test_finished_cells_are_skipped_and_no_cell_starts_past_the_budget(tmp_path, monkeypatch):
    grid = dataclasses.replace(smoke_grid(), seeds=(0, 1, 2), default_minutes={"smoke/tiny": 10})
    _fake_cell(tmp_path, "smoke/tiny/seed0", wall_s=240.0)
    started = _no_training(monkeypatch)
    said: list[str] = []
    # The estimate comes from the finished cell (4 min), not the stated default (10 min).
    assert runner.estimate_minutes(grid, grid.cells()[1], runner.finished_cells(tmp_path)) == pytest.approx(4.0)
    assert runner.run_grid(grid, tmp_path, tmp_path / "scratch", grid.cells(), budget_min=3, say=said.append) == 0
    assert started == [] and sum("not starting" in line for line in said) == 2
    # 7 minutes, by a clock at 0 when seed1 is considered and at 4 minutes for seed2: seed1 (4 min) ends at 4 and
    # starts; seed2 would end at 8 and does not.
    clock = iter([0.0, 0.0, 240.0])
    runner.run_grid(grid, tmp_path, tmp_path / "scratch", grid.cells(), budget_min=7, say=said.append,
                    clock=lambda: next(clock))  # fmt: skip
    assert started == ["smoke/tiny/seed1"]  # seed0 was finished, seed2 refused
    assert "not starting smoke/tiny/seed2" in said[-1]


def test_cells_of_absent_data_are_reported_with_the_command_that_builds_it(tmp_path, monkeypatch, capsys):
    absent = Data("photos", "photos", ("data=coco",), epochs=1, required_root=tmp_path / "nowhere",
                  build_hint="python -m experiments.devset.build --snapshot DIR")  # fmt: skip
    grid = dataclasses.replace(smoke_grid(), data=(absent,))
    started = _no_training(monkeypatch)
    said: list[str] = []
    assert runner.run_grid(grid, tmp_path, tmp_path / "scratch", grid.cells(), say=said.append) == 0
    assert started == [] and "python -m experiments.devset.build" in said[0]
    assert [row.state for row in runner.plan(grid, tmp_path, grid.cells())] == ["unavailable"]


def test_an_interrupted_cell_writes_nothing_and_exits_143(tmp_path, monkeypatch):
    def sleeping_training(grid, cell, work, children):  # a child that runs until it is told to stop
        children.run(cell, ["timeit", "-n", "1", "-r", "1", "import time; time.sleep(120)"], work / "train.log")

    monkeypatch.setattr(runner, "train_cell", sleeping_training)
    grid = smoke_grid()
    log = tmp_path / "scratch" / grid.cells()[0].id / "train.log"

    def terminate_once_started() -> None:
        while not (log.is_file() and "timeit" in log.read_text()):
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would: the runner passes it on to its child

    killer = threading.Thread(target=terminate_once_started, daemon=True)
    killer.start()
    said: list[str] = []
    code = runner.run_grid(grid, tmp_path / "out", tmp_path / "scratch", grid.cells(), say=said.append)
    killer.join(timeout=5)
    assert code == 128 + signal.SIGTERM
    assert not (tmp_path / "out" / "cells").exists() or not any((tmp_path / "out" / "cells").iterdir())
    assert "nothing of it was written" in said[-1]
    # the time spent so far is kept with the cell's scratch, so the finished cell reports all of it
    assert json.loads((log.parent / "timing.json").read_text())["train_s"] > 0


def test_report_is_made_from_cells_alone(tmp_path, monkeypatch):
    grid = Grid("toy", (Data("toy", "toy data", (), epochs=1),), TRUNKS[:2], seeds=(0,), thresholds=("seed",),
                retrievals=("prm_only",))  # fmt: skip
    _no_training(monkeypatch)
    # Lite0 + attention exact on both cats, Lite0 with a false positive between them: 1 - 5/6 = +16.7 points.
    _fake_cell(tmp_path, "toy/lite0_attn/seed0", records=perfect(),
               variants=("seed/prm_only/full", "seed/prm_only/detached"))  # fmt: skip
    _fake_cell(tmp_path, "toy/lite0/seed0", records=tp_fp_tp(), variants=("seed/prm_only/full",))
    write_report(grid, tmp_path, n_boot=10, say=lambda _: None)
    text = (tmp_path / "RESULTS.md").read_text()
    first = text.split("\n\n")[1]
    assert first.startswith("**Do RAN's attention masks give better peak response maps?**")
    assert "+16.7 points" in first and "2 of 2 cells" in first
    assert "All 2 cells of the grid are present." in text
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_model_table_shows_per_class_aps_of_the_well_populated_classes_both_protocols_and_wall_time(tmp_path):
    from experiments.attention_prm.report import model_lines

    grid = Grid("toy", (Data("toy", "toy data", (), epochs=1),), TRUNKS[:1], seeds=(0,), thresholds=("seed",),
                retrievals=("prm_only",))  # fmt: skip
    per_class = {"cat": {"n_gt": 20, "cls_ap": 0.75, "ap_50": 0.5}, "dog": {"n_gt": 19, "cls_ap": 1.0, "ap_50": 1.0}}
    metrics = {"cls_map": 0.5, "map_r_25": 0.25, "map_r_50": 0.125, "map_r_75": 0.0, "abo": 0.375,
               "pointing_map": 0.625}  # fmt: skip
    cell = {"cell": "toy/lite0/seed0", "data": "toy", "trunk": "lite0", "seed": 0, "wall_s": 90.0,
            "variants": {"seed/prm_only/full": {"metrics": metrics, "per_class": per_class}},
            "coco": {"seed/prm_only/full": {"metrics": {"map_r_50_95": 0.0625, "map_r_50": 0.125}}}}  # fmt: skip
    lines = model_lines(grid, {cell["cell"]: cell})
    header = next(line for line in lines if line.startswith("| trunk"))
    assert "cat (20)" in header and "dog" not in header  # 19 validation instances: below the 20 shown
    assert "| lite0 | 0 | 50.0 | 75.0 / 50.0 | 25.0 / 12.5 / 0.0 | 6.2 / 12.5 / – | 37.5 | 62.5 | 1.5 |" in lines


def test_report_mode_with_no_cells_says_the_question_is_open_and_lists_them(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    assert main(["--grid", "smoke", "--report", "--out", str(tmp_path), "--scratch", str(tmp_path / "s")]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "**Not answered yet.** 0 of the grid's 1 cells exist" in text
    assert "- `smoke/tiny/seed0` (estimated 1 min)" in text
    assert main(["--grid", "smoke", "--list", "--out", str(tmp_path), "--scratch", str(tmp_path / "s")]) == 0
    assert "smoke/tiny/seed0" in capsys.readouterr().out


@pytest.mark.slow
def test_a_smoke_cell_runs_end_to_end_and_is_then_skipped(tmp_path, monkeypatch):
    args = ["--grid", "smoke", "--out", str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch"), "--n-boot", "0"]
    assert main(args) == 0
    cell = json.loads((tmp_path / "out" / "cells" / "smoke__tiny__seed0.json").read_text())
    assert set(cell["variants"]) == {"seed/prm_only/full", "mean/prm_only/full"}
    # the class scores do not depend on the variant: kept once per image (so is any record two variants share)
    shared = cell["records"]["shared"]
    assert len(shared) == 8 and all("classification" in image for image in shared.values())
    assert cell["coco"]["seed/prm_only/full"]["protocol"] == "coco" and cell["machine"]["cpu"]
    assert "map_r_50_95" in cell["coco"]["seed/prm_only/full"]["metrics"]
    assert {entry["protocol"] for entry in cell["variants"].values()} == {"voc"}
    work = tmp_path / "scratch" / "smoke" / "tiny" / "seed0"
    assert sorted(p.name for p in work.glob("eval*")) == ["eval", "eval.log"]  # both protocols in one pass
    assert cell["config"]["backbone"]["name"] == "tiny" and cell["wall_s"] > 0 and cell["git"]["commit"]
    for name, entry in cell["variants"].items():
        images = unpack_records(cell["records"], name)
        assert len(images) == 8  # every validation image
        # the records give back the evaluator's own numbers: one definition of each metric
        again = record_metrics(list(images.values()), cell["class_names"])
        for key in ("map_r_25", "map_r_50", "map_r_75", "abo"):
            assert again[key] == pytest.approx(entry["metrics"][key], abs=1e-12)
    started = _no_training(monkeypatch)
    assert main(args) == 0 and started == []
    assert (tmp_path / "out" / "RESULTS.md").is_file()


def test_a_difference_is_consistent_only_when_every_seed_and_the_interval_agree():
    from experiments.attention_prm.analysis import Difference
    from experiments.attention_prm.report import direction

    assert direction(Difference("m", [0.1, 0.2, 0.05])) == 1
    assert direction(Difference("m", [-0.1, -0.2, -0.05], interval=(-0.3, -0.01))) == -1
    assert direction(Difference("m", [0.1, 0.2, 0.05], interval=(-0.01, 0.3))) == 0  # the interval holds 0
    assert direction(Difference("m", [0.1, -0.2, 0.05])) == 0  # the seeds disagree
    assert direction(Difference("m", [0.1])) == 0  # one seed is no consistency
