"""COCO results files: RLE round trip, write/read round trip, and a clear error for each bad-file case."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch

from ranprm.errors import PredictionsError
from ranprm.eval import EvalConfig, EvaluatorSuite, GroundTruth, InstanceMasks, prediction_from_instances
from ranprm.eval.results_io import (
    decode_rle,
    encode_mask,
    instances_to_results,
    read_results,
    write_results,
)
from ranprm.prm.instances import Instances

CLASSES = ("square", "disk")
SIZES = {"img_a": (16, 24), "img_b": (20, 16)}


def random_instances(size: tuple[int, int], n: int, seed: int) -> Instances:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    return Instances(
        image_size=size,
        masks=torch.rand(n, h, w, generator=g) > 0.6,
        labels=torch.randint(0, len(CLASSES), (n,), generator=g),
        scores=torch.rand(n, generator=g),
        peaks=torch.rand(n, 2, generator=g) * torch.tensor([h - 1.0, w - 1.0]),
        prms=torch.zeros(n, h, w),
    )


@pytest.mark.parametrize("fill", ["random", "empty", "full"])
def test_rle_round_trip_and_standard_counts(fill):
    fills = {"random": torch.rand(17, 23) > 0.5, "empty": torch.zeros(17, 23), "full": torch.ones(17, 23)}
    mask = fills[fill].bool()
    rle = encode_mask(mask)
    assert rle["size"] == [17, 23] and isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON-ready as is
    assert torch.equal(decode_rle(rle), mask)
    # The very string pycocotools writes: any COCO tool reads our files.
    assert coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))["counts"].decode() == rle["counts"]


def test_uncompressed_rle_counts_are_read():
    # column-major runs on a 4x4 image: 5 off, 2 on, 9 off -> pixels (1, 1) and (2, 1)
    mask = decode_rle({"size": [4, 4], "counts": [5, 2, 9]})
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1] = True
    assert torch.equal(mask, expected)


def test_write_read_round_trip(tmp_path):
    inst = random_instances(SIZES["img_a"], 3, seed=1)
    inst.peaks[1] = math.nan  # an instance without a peak: written without `peak`
    results = instances_to_results("img_a", inst, CLASSES)
    assert results[0]["category_id"] == int(inst.labels[0]) + 1
    assert results[0]["category"] == CLASSES[int(inst.labels[0])]
    assert "peak" not in results[1] and "peak" in results[0]
    path = write_results(tmp_path / "out" / "preds.json", results)
    assert [p.name for p in path.parent.iterdir()] == ["preds.json"]  # no temp file left behind
    assert len(json.loads(path.read_text())) == 3

    read = read_results(path, CLASSES, SIZES)
    assert list(read) == ["img_a", "img_b"]
    assert len(read["img_b"]) == 0 and read["img_b"].to_instances().masks.shape == (0, 20, 16)
    back = read["img_a"].to_instances()
    assert back.image_size == (16, 24)
    assert torch.equal(back.masks, inst.masks)
    assert torch.equal(back.labels, inst.labels)
    assert torch.allclose(back.scores.float(), inst.scores)
    assert torch.allclose(back.peaks[[0, 2]], inst.peaks[[0, 2]])
    assert torch.isnan(back.peaks[1]).all()
    assert back.prms.shape == (3, 16, 24) and back.prms.stride() == (0, 0, 0)


def test_empty_results_file(tmp_path):
    path = write_results(tmp_path / "empty.json", [])
    assert json.loads(path.read_text()) == []
    assert all(len(r) == 0 for r in read_results(path, CLASSES, SIZES).values())


def test_ground_truth_through_a_results_file_scores_one(tmp_path):
    """The evaluate CLI's predictions= path in miniature: GT written as results, read back, evaluated."""
    gts, results = [], []
    for k, (image_id, size) in enumerate(SIZES.items()):
        inst = random_instances(size, 2, seed=10 + k)
        inst.masks[0, :3] = True  # no empty GT mask
        inst.masks[1, -3:] = True
        void = torch.zeros(size, dtype=torch.bool)
        gts.append(GroundTruth(image_id, size, InstanceMasks(inst.masks, inst.labels, void)))
        results += instances_to_results(image_id, inst, CLASSES)
    path = write_results(tmp_path / "gt.json", results)
    read = read_results(path, CLASSES, SIZES)
    for protocol in ("voc", "coco"):
        suite = EvaluatorSuite(CLASSES, EvalConfig(protocol=protocol))
        for g in gts:
            suite.update([g], [prediction_from_instances(read[g.image_id].to_instances())])
        result = suite.compute().to_record()
        assert [result[k] for k in ("map_r_25", "map_r_50", "map_r_75", "abo")] == pytest.approx([1.0] * 4)


def _good_entries() -> list[dict]:
    a = torch.zeros(16, 24, dtype=torch.bool)
    a[2:6, 3:9] = True
    b = torch.zeros(20, 16, dtype=torch.bool)
    b[5:15, 5:10] = True
    return [
        {"image_id": "img_a", "category_id": 1, "score": 0.9, "segmentation": encode_mask(a)},
        {
            "image_id": "img_b",
            "category_id": 2,
            "category": "disk",
            "score": 0.4,
            "segmentation": encode_mask(b),
        },
    ]


def _set(key, value):
    def edit(entry):
        entry[key] = value

    return edit


def _set_seg(key, value):
    def edit(entry):
        entry["segmentation"][key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("image_id", "img_zzz"), "not in the evaluated split"),
        (_set("image_id", 7), "image stem as a string"),
        (_set("category_id", 3), "unknown category_id 3"),
        (_set("category_id", 0), "unknown category_id 0"),
        (_set("category_id", "2"), "unknown category_id '2'"),
        (_set("category", "square"), "contradicts category_id 2"),
        (_set("score", float("nan")), "score must be a finite number"),
        (_set("score", float("inf")), "score must be a finite number"),
        (_set("score", "0.4"), "score must be a finite number"),
        (lambda e: e.pop("score"), "missing key(s) score"),
        (lambda e: (e.pop("segmentation"), e.pop("category_id")), "missing key(s) category_id, segmentation"),
        (_set("segmentation", "not-rle"), "segmentation must be a COCO RLE object"),
        (_set_seg("counts", "zzzz"), "malformed segmentation RLE"),
        (_set_seg("counts", "0"), "malformed segmentation RLE"),
        (_set_seg("counts", 17), "malformed segmentation RLE"),
        (_set_seg("size", [16, 24]), "differs from the image's size [20, 16]"),
        (_set("peak", [3.0]), "peak must be [y, x]"),
        (_set("peak", ["a", 2]), "peak must be [y, x]"),
    ],
)
def test_bad_entry_is_named(tmp_path, edit, message):
    entries = _good_entries()
    edit(entries[1])
    path = tmp_path / "bad.json"
    # json.dumps writes NaN/Infinity as the non-standard tokens other tools emit; the reader must catch them.
    path.write_text(json.dumps(entries))
    with pytest.raises(PredictionsError) as err:
        read_results(path, CLASSES, SIZES)
    text = str(err.value)
    assert message in text
    assert "entry 1" in text and str(path) in text and "\n" not in text
    if isinstance(entries[1].get("image_id"), str):
        assert repr(entries[1]["image_id"]) in text


def test_entry_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([_good_entries()[0], 5]))
    with pytest.raises(PredictionsError, match="entry 1: expected an object"):
        read_results(path, CLASSES, SIZES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"image_id": "img_a",', "is not valid JSON"),
        ('{"image_id": "img_a"}', "must hold a JSON list"),
        ("", "is not valid JSON"),
    ],
)
def test_bad_file_names_the_file(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(PredictionsError, match=message) as err:
        read_results(path, CLASSES, SIZES)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(PredictionsError, match="does not exist"):
        read_results(tmp_path / "nope.json", CLASSES, SIZES)


def test_writer_refuses_nan(tmp_path):
    entry = _good_entries()[0] | {"score": float("nan")}
    with pytest.raises(ValueError):
        write_results(tmp_path / "x.json", [entry])
    assert not list(tmp_path.iterdir())
