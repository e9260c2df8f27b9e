"""`data=coco`: a tiny COCO-format folder written here (tests/coco_cases.py) with every annotation form and masks
known by construction; the decoded masks, labels, crowd rule, class mapping, dropping, every bad input, results
files with COCO's ids, COCOeval's own numbers, and a short train + evaluate run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranprm.cli.config import compose
from ranprm.data.coco import COCOSource, load_split
from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.data.voc import VOC_CLASSES
from ranprm.errors import ConfigError, DataError, PredictionsError
from ranprm.eval import PROTOCOLS, EvalConfig, ground_truth, read_results, write_results
from ranprm.eval.results_io import encode_mask
from ranprm.evaluate import evaluate
from tests.coco_cases import CATEGORIES, COCO_IDS, VAL_IMAGES, H, W, expected_mask, rect, write_coco


@pytest.fixture
def coco_root(tmp_path):
    return write_coco(tmp_path / "coco")


def _data(root: Path, classes: str = "voc") -> list[str]:
    return ["data=coco", f"data.root={root}", "data.train_split=train", "data.val_split=val", f"data.classes={classes}",
            "data.image_size=64", "data.batch_size=4", "data.num_workers=0"]  # fmt: skip


def _datamodule(root: Path, **options: Any) -> VOCDataModule:
    values = {"name": "coco", "format": "coco", "root": str(root), "classes": "voc", "train_split": "train",
              "val_split": "val", "num_workers": 0, **options}  # fmt: skip
    return VOCDataModule(DataConfig.from_config(values))


# ------------------------------------------------------------------------------------------- masks and labels
def test_every_annotation_form_decodes_to_its_mask_pixel_for_pixel(coco_root):
    source = COCOSource(coco_root, "all", mask_splits=["val"])
    names = source.class_names
    assert names == tuple(c["name"] for c in sorted(CATEGORIES, key=lambda c: c["id"]))  # `all`: id order
    source.split_ids("val", "", training=False)
    for image_id, anns in VAL_IMAGES:
        targets = source.instance_targets(f"{image_id:012d}", (H, W))
        assert targets.masks.shape == (len(anns), H, W) and not targets.void.any()  # COCO has no void
        for k, (_, category_id, iscrowd, _, rects) in enumerate(anns):
            assert np.array_equal(targets.masks[k].numpy(), expected_mask(rects)), (image_id, k)
            assert names[int(targets.labels[k])] == next(c["name"] for c in CATEGORIES if c["id"] == category_id)
            assert bool(targets.iscrowd[k]) == bool(iscrowd)


def test_voc_classes_are_mapped_from_coco_names_and_labels_come_from_non_crowd_instances(coco_root):
    dm = _datamodule(coco_root)
    assert dm.class_names == VOC_CLASSES
    dm.setup()
    sample = dm.val_set[0]  # image 101: person, airplane, dog, a crowd of people, a kite
    assert sample["image_id"] == "000000000101" and sample["orig_size"] == (H, W)
    labelled = {VOC_CLASSES[i] for i in sample["labels"].nonzero().flatten().tolist()}
    assert labelled == {"person", "aeroplane", "dog"}  # airplane -> aeroplane; the kite is not a VOC class
    targets = sample["targets"]
    assert [VOC_CLASSES[i] for i in targets.labels.tolist()] == ["person", "aeroplane", "dog", "person"]
    assert targets.iscrowd.tolist() == [False, False, False, True]
    # boxes for the pointing game, VOC-style (1-based inclusive) around COCO's [x, y, w, h]; no crowd box
    assert [o.box for o in sample["objects"]] == [(5, 7, 20, 30), (31, 31, 60, 40), (41, 3, 50, 10)]
    # every renamed class maps: a source with all 20 finds each by its COCO name
    selection = dm.source.selection
    for coco_name, voc_name in (("airplane", "aeroplane"), ("motorcycle", "motorbike"), ("couch", "sofa"),
                                ("tv", "tvmonitor"), ("dining table", "diningtable"),
                                ("potted plant", "pottedplant")):  # fmt: skip
        assert selection.category_ids[VOC_CLASSES.index(voc_name)] == COCO_IDS[coco_name]


def test_a_list_of_classes_keeps_those_in_its_order(coco_root):
    dm = _datamodule(coco_root, classes=["dog", "aeroplane", "kite"])  # a VOC name of a renamed class works too
    dm.setup()
    assert dm.class_names == ("dog", "aeroplane", "kite")
    assert dm.source.selection.category_ids == (18, 5, 38)
    assert dm.train_set.ids == [f"{i:012d}" for i in (2, 3, 4, 5, 6)]  # 1 has a person only, 7 a crowd only
    val = {s["image_id"]: s for s in (dm.val_set[i] for i in range(len(dm.val_set)))}
    assert val["000000000102"]["labels"].tolist() == [0.0, 0.0, 1.0]


def test_images_without_a_kept_instance_leave_training_and_are_counted_but_stay_evaluated(coco_root, caplog):
    dm = _datamodule(coco_root)
    with caplog.at_level(logging.INFO, logger="ranprm.data.coco"):
        train, val = dm.split_ids()
    # 6: only a kite; 7: only a crowd (no image-level label)
    assert train == [f"{i:012d}" for i in (1, 2, 3, 4, 5)]
    assert "2 of the 7 images of instances_train.json" in caplog.text
    assert val == [f"{i:012d}" for i, _ in VAL_IMAGES]  # 102 (a kite only) is scored: predictions there are FPs
    dm.setup()
    empty = dm.val_set[1]
    assert empty["labels"].sum() == 0 and empty["targets"].masks.shape == (0, H, W)


def test_crowd_is_void_under_voc_and_a_crowd_under_coco(coco_root):
    dm = _datamodule(coco_root)
    dm.setup()
    sample = dm.val_set[0]
    gt = ground_truth(sample["image_id"], sample["orig_size"], dm.class_names, targets=sample["targets"])
    crowd = torch.from_numpy(rect(36, 46, 2, 20))
    assert torch.equal(gt.void, crowd)
    masks, labels = gt.scored_instances  # VOC's rule: three instances, crowd pixels removed
    assert len(masks) == 3 and not (masks & crowd).any()
    masks, labels, iscrowd, void = PROTOCOLS.get("coco")(EvalConfig(protocol="coco")).scored_ground_truth(gt)
    assert iscrowd.tolist() == [False, False, False, True] and not void.any()
    assert torch.equal(masks[3], crowd)


# ------------------------------------------------------------------------------------------------ bad input
def _mutate(root: Path, split: str, change) -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


BAD_ANNOTATIONS = {
    "missing image": (lambda d: _ann(d, 13).update(image_id=999), "annotation 13 names image id 999"),
    "unknown category": (lambda d: _ann(d, 13).update(category_id=77),
                         "annotation 13 (image 101) names category id 77"),
    "image id of the wrong type": (lambda d: _ann(d, 13).update(image_id=[101]),
                                   "annotation 13 names image id [101]"),
    "two-point polygon": (lambda d: _ann(d, 11).update(segmentation=[[1, 1, 5, 5]]),
                          "annotation 11 (image 101) has a polygon with 2 point(s)"),
    "RLE of another size": (lambda d: _ann(d, 12)["segmentation"].update(size=[W, H]),
                            "annotation 12 (image 101) has an RLE of size [64, 48]"),
    "polygon of strings": (lambda d: _ann(d, 11).update(segmentation=[["1", 1, 5, 5, 1, 5]]),
                           "annotation 11 (image 101) has a polygon that is not a flat list of finite x, y numbers"),
    "runs not covering the image": (lambda d: _ann(d, 13)["segmentation"]["counts"].append(3),
                                    "annotation 13 (image 101) has RLE counts summing to 3075"),
    "uncompressed RLE of another size": (lambda d: _ann(d, 13)["segmentation"].update(size=[H, W + 1]),
                                         "annotation 13 (image 101) has an RLE of size [48, 65]"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_a_bad_annotation_is_one_line_naming_the_file_and_id_or_a_counted_skip(coco_root, case, caplog):
    change, message = BAD_ANNOTATIONS[case]
    path = _mutate(coco_root, "val", change)
    with pytest.raises(DataError) as err:
        _datamodule(coco_root).setup()
    assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="ranprm.data.coco"):
        split = load_split(coco_root, "val", "voc", keep_segmentation=True, skip_bad_images=True)
    assert "skipped 1 image(s) or annotation(s)" in caplog.text and len(split.skipped) == 1
    # a bad annotation takes its image out; one naming a missing image is left out itself
    names_no_image = case in ("missing image", "image id of the wrong type")
    expected = {"000000000102", "000000000103"} | ({"000000000101"} if names_no_image else set())
    assert set(split.images) == expected


def test_malformed_json_and_a_missing_image_file_are_one_line(coco_root):
    (coco_root / "val" / "000000000103.jpg").unlink()
    with pytest.raises(DataError, match=r"image 103 has no file .*000000000103\.jpg.*skip_bad_images"):
        _datamodule(coco_root).setup()
    split = load_split(coco_root, "val", "voc", keep_segmentation=True, skip_bad_images=True)
    assert list(split.images) == ["000000000101", "000000000102"] and len(split.skipped) == 1
    path = coco_root / "annotations" / "instances_val.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(DataError, match=r"instances_val\.json is not valid JSON \(.* at line 1 column \d+\)"):
        _datamodule(coco_root).setup()


def test_bad_options_are_one_line(coco_root):
    with pytest.raises(ConfigError, match="data.classes='bogus' is not valid"):
        _datamodule(coco_root, classes="bogus")
    with pytest.raises(ConfigError, match="has no category 'giraffe'"):
        _datamodule(coco_root, classes=["dog", "giraffe"]).setup()
    with pytest.raises(ConfigError, match="data.class_names is a VOC-layout option"):
        _datamodule(coco_root, class_names=["dog"])
    with pytest.raises(ConfigError, match="data.classes is an option of data.format=coco"):
        VOCDataModule(DataConfig.from_config({"root": str(coco_root), "classes": "voc"}))
    with pytest.raises(DataError, match="lacks annotations/"):
        _datamodule(coco_root / "val")


# ----------------------------------------------------------------------------- results files and COCOeval
PREDICTIONS = [  # (COCO image id, category name, score, mask): every case COCOeval treats in its own way
    (101, "person", 0.9, rect(6, 30, 4, 20)),  # exact
    (101, "person", 0.8, rect(38, 46, 2, 12)),  # inside the crowd: ignored, neither TP nor FP
    (101, "airplane", 0.7, rect(30, 40, 32, 60)),  # IoU 280/300: a TP up to 0.9
    (101, "dog", 0.6, rect(2, 10, 40, 45)),  # IoU 0.5
    (101, "kite", 0.5, rect(12, 20, 30, 38)),  # exact (a kite: kept under classes=all)
    (103, "dog", 0.65, rect(5, 15, 5, 15)),  # one of the dog's two parts: IoU 0.4
    (103, "person", 0.95, rect(20, 30, 40, 50)),  # no person there: a false positive
    (101, "dog", 0.3, rect(2, 10, 40, 50)),  # exact but ranked below the IoU-0.5 one: a duplicate at 0.5
]  # image 102 (a kite) gets no prediction


def _results_file(path: Path) -> Path:
    entries = [{"image_id": image_id, "category_id": COCO_IDS[name], "score": score,
                "segmentation": encode_mask(mask)} for image_id, name, score, mask in PREDICTIONS]  # fmt: skip
    return write_results(path, entries)


def _cocoeval_stats(cocoeval_cls, coco_cls, gt_path: Path, results: Path, cat_ids=None) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls(str(gt_path))
        dt = gt.loadRes(str(results))
        ev = cocoeval_cls(gt, dt, "segm")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats[:3]]


@pytest.mark.parametrize("classes", ["all", "voc"])
def test_coco_protocol_equals_cocoeval_segm_on_the_same_files(coco_root, tmp_path, classes):
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = _results_file(tmp_path / "preds.json")
    if classes == "voc":  # the kite's prediction is not a VOC class: COCOeval is told the same categories
        data = json.loads(results.read_text())
        write_results(results, [e for e in data if e["category_id"] != COCO_IDS["kite"]])
    cat_ids = None if classes == "all" else sorted(v for k, v in COCO_IDS.items() if k != "kite")
    gt_path = coco_root / "annotations" / "instances_val.json"
    expected = _cocoeval_stats(COCOeval, COCO, gt_path, results, cat_ids)
    faster = _cocoeval_stats(COCOeval_faster, FasterCOCO, gt_path, results, cat_ids)
    assert faster == pytest.approx(expected, abs=1e-12)
    assert 0.2 < expected[0] < expected[1] < 1.0  # a case where every rule matters, not a trivial 0 or 1

    cfg = compose("evaluate", [*_data(coco_root, classes), f"predictions={results}", f"output={tmp_path / 'o'}",
                               "eval.protocol=coco"])  # fmt: skip
    metrics = evaluate(cfg)
    got = [metrics["map_r_50_95"], metrics["map_r_50"], metrics["map_r_75"]]
    assert got == pytest.approx(expected, abs=1e-12)
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written["split"] == "instances_val" and written["data"] == "coco"


def test_results_files_use_coco_ids_and_read_back(coco_root, tmp_path):
    dm = _datamodule(coco_root, classes="all")
    dm.split_ids()
    ids = dm.source.result_ids()
    from ranprm.eval import instances_to_results
    from ranprm.prm.instances import Instances

    dog = dm.class_names.index("dog")
    inst = Instances((H, W), torch.from_numpy(rect(2, 10, 40, 50))[None], torch.tensor([dog]),
                     torch.tensor([0.5], dtype=torch.float64), torch.tensor([[5.0, 44.0]]),
                     torch.zeros(1, H, W))  # fmt: skip
    entries = instances_to_results("000000000101", inst, dm.class_names, ids)
    assert entries[0]["image_id"] == 101 and entries[0]["category_id"] == 18 and entries[0]["category"] == "dog"
    path = write_results(tmp_path / "p.json", entries)
    sizes = {f"{i:012d}": (H, W) for i, _ in VAL_IMAGES}
    read = read_results(path, dm.class_names, sizes, ids)
    assert read["000000000101"].labels.tolist() == [dog] and len(read["000000000103"]) == 0
    for bad, message in ((dict(image_id="000000000101"), "must be the annotation file's int image id"),
                         (dict(image_id=7), "not in the evaluated split"),
                         (dict(category_id=dog + 1), "is not one of the evaluated classes' COCO ids"),
                         (dict(category="cat"), "contradicts category_id 18")):  # fmt: skip
        write_results(tmp_path / "bad.json", [{**entries[0], **bad}])
        with pytest.raises(PredictionsError, match=message):
            read_results(tmp_path / "bad.json", dm.class_names, sizes, ids)


def test_predict_finds_coco_ids_by_file_name_and_class_name(coco_root):
    from ranprm.data.coco import result_ids_for_images

    gt_path = coco_root / "annotations" / "instances_val.json"
    images = sorted((coco_root / "val").iterdir())
    ids = result_ids_for_images(gt_path, VOC_CLASSES, images)  # a checkpoint trained with classes=voc
    assert dict(ids.image_ids) == {"000000000101": 101, "000000000102": 102, "000000000103": 103}
    assert ids.category_ids[VOC_CLASSES.index("aeroplane")] == 5 and ids.category_names[0] == "airplane"
    with pytest.raises(DataError, match=r"does not list 1 input image\(s\) \(first: '000000000001.jpg'\)"):
        result_ids_for_images(gt_path, VOC_CLASSES, [*images, coco_root / "train" / "000000000001.jpg"])
    with pytest.raises(DataError, match="the checkpoint's classes do not match"):
        result_ids_for_images(gt_path, ("square", "disk"), images)


# --------------------------------------------------------------------------------------- train and evaluate
def test_a_short_training_run_and_evaluate_with_both_protocols(coco_root, tmp_path):
    from ranprm.train import train
    from tests.test_train import tiny_overrides

    overrides = [o for o in tiny_overrides(coco_root, tmp_path / "run") if not o.startswith("data.")]
    overrides += [*_data(coco_root), "trainer.max_epochs=1", "callbacks.panels.num_images=1"]
    train(compose("train", overrides))
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["global_step"] == 2  # 5 training images (2 left out), batch 4, 1 epoch
    assert len(list((tmp_path / "run" / "panels" / "epoch_000").glob("*.png"))) == 1  # a panel of a COCO image
    assert summary["instance_metrics"]["num_images"] == 3  # every val image, the one without a VOC instance too
    assert summary["instance_metrics"]["num_gt"] == 4  # person, airplane, dog; dog: the crowd does not count
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for protocol in ("voc", "coco"):
        out = tmp_path / protocol
        cfg = compose("evaluate", [*_data(coco_root), f"ckpt={ckpt}", f"output={out}", f"eval.protocol={protocol}",
                                   "device=cpu", "progress_bar=none"])  # fmt: skip
        metrics = evaluate(cfg)
        written = json.loads((out / "metrics.json").read_text())
        assert written["protocol"] == protocol and written["split"] == "instances_val"
        assert written["num_gt"] == 4 and written["skipped_images"] == 0
        assert 0.0 <= metrics["map_r_50"] <= 1.0 and "cls_map" in metrics

    # ranprm-predict on the val images with their annotation file writes COCO's ids, which COCO's tools and
    # ranprm-evaluate data=coco read back
    from pycocotools.coco import COCO

    from ranprm.predict import predict

    gt_path = coco_root / "annotations" / "instances_val.json"
    preds = tmp_path / "preds"
    predict(compose("predict", [f"ckpt={ckpt}", f"input={coco_root / 'val'}", f"output={preds}", "device=cpu",
                                f"coco_annotations={gt_path}", "progress_bar=none"]))  # fmt: skip
    entries = json.loads((preds / "predictions.json").read_text())
    assert entries and {e["image_id"] for e in entries} <= {101, 102, 103}
    assert all(COCO_IDS[e["category"]] == e["category_id"] for e in entries)  # COCO's names and ids, not VOC's
    with contextlib.redirect_stdout(io.StringIO()):
        assert len(COCO(str(gt_path)).loadRes(str(preds / "predictions.json")).anns) == len(entries)
    cfg = compose("evaluate", [*_data(coco_root), f"predictions={preds / 'predictions.json'}",
                               f"output={tmp_path / 'from_file'}"])  # fmt: skip
    assert evaluate(cfg)["num_predictions"] == len(entries)


def test_panels_draw_crowd_regions_as_void_not_as_instances(coco_root):
    from types import SimpleNamespace

    from ranprm.lightning.panels import panel_inputs

    dm = _datamodule(coco_root)
    dm.setup()
    sample = dm.val_set[0]
    prediction = SimpleNamespace(crms=None, valid_classes=None, peaks=None, prms=None, instances=None,
                                 attention=None, class_logits=None)  # fmt: skip
    inputs = panel_inputs(prediction, sample["raw_image"], sample["targets"], dm.class_names)
    assert [dm.class_names[i] for i in inputs.gt_labels.tolist()] == ["person", "aeroplane", "dog"]
    assert len(inputs.gt_masks) == 3


def test_bad_coco_data_stops_training_before_anything_is_written(coco_root, tmp_path):
    from ranprm.train import train
    from tests.test_train import tiny_overrides

    _mutate(coco_root, "train", lambda d: _ann(d, 104).update(segmentation=[[1, 1, 5, 5]]))
    overrides = [o for o in tiny_overrides(coco_root, tmp_path / "run") if not o.startswith("data.")]
    with pytest.raises(DataError, match=r"instances_train\.json: annotation 104 \(image 3\) has a polygon with 2"):
        train(compose("train", [*overrides, *_data(coco_root)]))
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
