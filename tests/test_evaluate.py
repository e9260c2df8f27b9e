"""`ranprm-evaluate`: known answers in predictions= mode, the metrics file in ckpt= mode, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranprm.cli.config import compose
from ranprm.data.voc import read_instance_masks, read_split
from ranprm.errors import ConfigError, PredictionsError
from ranprm.eval import decode_rle, encode_mask, write_results
from ranprm.evaluate import evaluate, image_size_of
from tests.helpers import CLASSES
from tests.test_predict import EVERYTHING, tiny_model  # noqa: F401  (the module-scoped fixture)

KEYS = ("map_r_25", "map_r_50", "map_r_75", "abo")


def _data(voc: Path) -> list[str]:
    return ["data=voc", f"data.root={voc}", f"data.class_names=[{','.join(CLASSES)}]", "data.image_size=64",
            "data.num_workers=0", "data.batch_size=4"]  # fmt: skip


def _gt_results(voc: Path) -> list[dict]:
    entries = []
    for image_id in read_split(voc, "Segmentation", "val"):
        gt = read_instance_masks(voc, image_id, image_size_of(voc / "JPEGImages" / f"{image_id}.jpg"))
        for mask, label in zip(gt.masks, gt.labels.tolist(), strict=True):
            entries.append({"image_id": image_id, "category_id": label + 1, "category": CLASSES[label],
                            "score": 1.0, "segmentation": encode_mask(mask)})  # fmt: skip
    return entries


def test_ground_truth_as_predictions_scores_one(voc_root, tmp_path):
    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={tmp_path / 'o'}"])
    metrics = evaluate(cfg)
    for key in KEYS:
        assert metrics[key] == pytest.approx(1.0)
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written["map_r_50"] == pytest.approx(1.0) and written["mode"] == "predictions"
    assert written["protocol"] == "voc"  # the default
    assert set(written["per_class"]) == set(CLASSES)
    # a results file has no class scores: no classification mAP, no pointing game; no `peak`: no pointing either
    assert "cls_map" not in written and "pointing_map" not in written and "pointing_accuracy" not in written
    assert written["metric_names"] == ["map_r_25", "map_r_50", "map_r_75", "abo"]
    table = (tmp_path / "o" / "per_class.md").read_text()
    assert "| square |" in table and "protocol voc" in table


def test_output_is_the_run_folder_and_nothing_goes_under_outputs(voc_root, tmp_path):
    """`output=DIR` from the command line: results, log and `.hydra/` record in DIR; no ./outputs run folder."""
    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RANPRM_LOG_DIR", None)
    command = [sys.executable, "-m", "ranprm.evaluate", *_data(voc_root), f"predictions={tmp_path / 'gt.json'}",
               f"output={tmp_path / 'o'}"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert not (cwd / "outputs").exists() and list(cwd.iterdir()) == []
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["map_r_50"] == pytest.approx(1.0)
    assert (tmp_path / "o" / ".hydra" / "overrides.yaml").is_file()
    assert not list((tmp_path / "o").glob(".hydra-pending*"))
    # refused (metrics.json there, no overwrite=true): one line naming output=, the earlier record kept as it was
    record = (tmp_path / "o" / ".hydra" / "overrides.yaml").read_text()
    proc = subprocess.run([*command, "records=true"], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)
    assert proc.returncode == 2 and "output=" in proc.stderr and "overwrite=true" in proc.stderr, proc.stderr
    assert (tmp_path / "o" / ".hydra" / "overrides.yaml").read_text() == record
    assert not (cwd / "outputs").exists()


def _spilled_results(voc: Path) -> list[dict]:
    """Every GT mask grown by one pixel: exactly into the 1-px void band the test data draws around objects."""
    entries = _gt_results(voc)
    for entry in entries:
        m = decode_rle(entry["segmentation"])
        grown = m.clone()
        grown[1:] |= m[:-1]
        grown[:-1] |= m[1:]
        grown[:, 1:] |= m[:, :-1]
        grown[:, :-1] |= m[:, 1:]
        entry["segmentation"] = encode_mask(grown)
    return entries


def test_void_spill_costs_under_voc_and_not_under_coco(voc_root, tmp_path):
    write_results(tmp_path / "spill.json", _spilled_results(voc_root))
    abo = {}
    for protocol in ("voc", "coco"):
        out = tmp_path / protocol
        cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'spill.json'}", f"output={out}",
                                   f"eval.protocol={protocol}"])  # fmt: skip
        metrics = evaluate(cfg)
        assert json.loads((out / "metrics.json").read_text())["protocol"] == protocol
        assert f"protocol {protocol}" in (out / "per_class.md").read_text()
        abo[protocol] = metrics["abo"]
        assert metrics["map_r_50"] == pytest.approx(1.0)  # still above 0.5 either way
    # coco removes the band from the predictions again: perfect; voc counts it in the union
    assert abo["coco"] == pytest.approx(1.0) and abo["voc"] < 0.9
    coco = json.loads((tmp_path / "coco" / "metrics.json").read_text())
    assert "map_r_50_95" in coco and "map_r_50_95" in coco["metric_names"]


def test_empty_predictions_give_zeros(voc_root, tmp_path):
    write_results(tmp_path / "empty.json", [])
    cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'empty.json'}", f"output={tmp_path}"])
    metrics = evaluate(cfg)
    assert all(metrics[k] == 0.0 for k in KEYS)


def test_checkpoint_mode_writes_metrics(tiny_model, tmp_path):  # noqa: F811
    voc, ckpt = tiny_model
    out = tmp_path / "o"
    cfg = compose("evaluate", [*_data(voc), f"ckpt={ckpt}", f"output={out}", "eval.max_images=2", *EVERYTHING])
    evaluate(cfg)
    written = json.loads((out / "metrics.json").read_text())
    for key in (*KEYS, "pointing_accuracy", "pointing_map", "cls_map", "per_class", "protocol", "metric_names"):
        assert key in written, key
    assert written["num_images"] == 2
    assert set(written["metric_names"]) == {*KEYS, "pointing_accuracy", "pointing_recall", "pointing_map", "cls_map"}
    assert {"ap_50", "cls_ap", "pointing_ap", "n_gt"} <= set(written["per_class"]["square"])
    assert written["threshold"]["name"] == "fixed"  # the command line's group replaced the checkpoint's
    assert (out / "per_class.md").is_file()


def test_exactly_one_source(voc_root, tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        evaluate(compose("evaluate", [*_data(voc_root), f"output={tmp_path}"]))
    with pytest.raises(ConfigError, match="both"):
        evaluate(compose("evaluate", [*_data(voc_root), "ckpt=a", "predictions=b", f"output={tmp_path}"]))


def test_unknown_image_is_a_one_line_error(voc_root, tmp_path):
    entries = _gt_results(voc_root)
    entries[0] = {**entries[0], "image_id": "not_in_split"}
    write_results(tmp_path / "bad.json", entries)
    cfg = compose("evaluate", [*_data(voc_root), f"predictions={tmp_path / 'bad.json'}", f"output={tmp_path}"])
    with pytest.raises(PredictionsError, match="not_in_split"):
        evaluate(cfg)
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ranprm.evaluate", *_data(voc_root), f"predictions={tmp_path / 'bad.json'}",
         f"output={tmp_path / 'cli'}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ranprm: error:"), proc.stderr
    assert "not_in_split" in lines[0] and "entry 0" in lines[0]
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_records_true_saves_per_image_records_that_give_back_the_metrics(voc_root, tmp_path):
    from ranprm.eval import EVALUATORS, EvalConfig
    from ranprm.utils.io import load_torch_file

    write_results(tmp_path / "gt.json", _gt_results(voc_root))
    out = tmp_path / "o"
    given = [*_data(voc_root), f"predictions={tmp_path / 'gt.json'}", f"output={out}"]
    metrics = evaluate(compose("evaluate", [*given, "records=true"]))
    records = load_torch_file(out / "records.pt", "records")
    assert set(records) == {"instance_ap", "abo", "pointing", "pointing_game", "classification"}
    ids = [image_id for image_id, _ in records["instance_ap"]]
    assert ids == sorted(read_split(voc_root, "Segmentation", "val"))
    for name, keys in (("instance_ap", KEYS[:3]), ("abo", KEYS[3:])):
        again = EVALUATORS.get(name)(CLASSES, EvalConfig()).reduce([r for _, r in records[name]])
        assert [again.metrics[k] for k in keys] == [metrics[k] for k in keys]  # the same numbers, exactly
    # without records=true a rerun into the folder leaves no stale records.pt beside its new metrics
    evaluate(compose("evaluate", [*given, "overwrite=true"]))
    assert not (out / "records.pt").exists()
