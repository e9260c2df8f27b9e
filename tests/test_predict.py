"""`ranprm-predict`: overlays and a COCO results file whose RLE decodes back to the model's masks."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ranprm.cli.config import compose
from ranprm.cli.inference import apply_inference_overrides
from ranprm.data.transforms import build_transform
from ranprm.data.voc import read_image
from ranprm.errors import ConfigError, DataError
from ranprm.eval import decode_rle
from ranprm.lightning.checkpoint import load_module
from ranprm.predict import predict
from ranprm.train import train
from tests.helpers import CLASSES, write_voc

# Every class and every peak is valid: a barely trained model still yields instances to check.
EVERYTHING = ["threshold=fixed", "threshold.classes.value=-1e9", "threshold.peaks.value=-1e9"]


@functools.lru_cache(maxsize=1)
def _train_tiny(root: str) -> tuple[Path, Path]:
    voc = write_voc(Path(root) / "VOC2012")
    run = Path(root) / "run"
    cfg = compose(
        "train",
        [
            "backbone=tiny",
            f"data.root={voc}",
            f"data.class_names=[{','.join(CLASSES)}]",
            "data.image_size=64",
            "data.batch_size=8",
            "data.num_workers=0",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "+trainer.limit_val_batches=0",
            "optimized_metric=null",
            "logger=none",
            "callbacks.progress_bar=none",
            "callbacks.panels.num_images=0",
            f"paths.output_dir={run}",
        ],
    )
    train(cfg)
    return voc, run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, Path]:
    """(VOC root, checkpoint) of a tiny model trained for one epoch on 64 px images; trained once per session."""
    return _train_tiny(str(tmp_path_factory.getbasetemp() / "tiny_model"))


def _predict_cfg(ckpt: Path, inp: Path, out: Path, *extra: str):
    return compose("predict", [f"ckpt={ckpt}", f"input={inp}", f"output={out}", "image_size=64", *EVERYTHING, *extra])


def _inputs(voc: Path, folder: Path) -> Path:
    """A JPEG, a grayscale PNG and an RGBA PNG of odd sizes."""
    folder.mkdir()
    src = voc / "JPEGImages" / "2024_000001.jpg"
    shutil.copy(src, folder / "colour.jpg")
    rgb = Image.open(src).convert("RGB")
    rgb.convert("L").resize((70, 50)).save(folder / "grey.png")
    rgba = rgb.convert("RGBA").resize((48, 80))
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    return folder


def test_predict_writes_overlays_and_rle_that_decodes_to_the_masks(tiny_model, tmp_path):
    voc, ckpt = tiny_model
    inp, out = _inputs(voc, tmp_path / "in"), tmp_path / "out"
    results = predict(_predict_cfg(ckpt, inp, out))

    written = json.loads((out / "predictions.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert {e["image_id"] for e in written} == {"colour", "grey", "alpha"}
    cfg = _predict_cfg(ckpt, inp, out)
    module = load_module(ckpt)
    apply_inference_overrides(module, cfg)
    transform = build_transform(64, train=False)
    for stem, suffix in (("colour", ".jpg"), ("grey", ".png"), ("alpha", ".png")):
        image = read_image(inp / f"{stem}{suffix}")
        h, w = image.shape[1:]
        overlay = np.asarray(Image.open(out / f"{stem}.png"))
        assert overlay.shape == (h, w, 3)
        (expected,) = module.predict_images(transform(image)[None], [(h, w)], [image.permute(1, 2, 0).numpy()])
        entries = [e for e in written if e["image_id"] == stem]
        assert len(entries) == len(expected.instances.labels) > 0
        for entry, mask, label, score in zip(
            entries, expected.instances.masks, expected.instances.labels, expected.instances.scores, strict=True
        ):
            assert entry["segmentation"]["size"] == [h, w]
            assert isinstance(entry["segmentation"]["counts"], str)
            assert torch.equal(decode_rle(entry["segmentation"]), mask)
            assert entry["category_id"] == int(label) + 1
            assert entry["category"] == CLASSES[int(label)]
            assert entry["score"] == pytest.approx(float(score))


def test_predict_refuses_to_overwrite(tiny_model, tmp_path):
    voc, ckpt = tiny_model
    image = voc / "JPEGImages" / "2024_000002.jpg"
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("[]\n")  # a user's file
    with pytest.raises(ConfigError, match="overwrite=true"):
        predict(_predict_cfg(ckpt, image, out))
    assert (out / "predictions.json").read_text() == "[]\n"
    assert not (out / "2024_000002.png").exists()
    predict(_predict_cfg(ckpt, image, out, "overwrite=true"))
    assert json.loads((out / "predictions.json").read_text())
    # an overlay must never replace an input image, even with overwrite=true
    inp = tmp_path / "pngs"
    inp.mkdir()
    Image.open(image).save(inp / "x.png")
    with pytest.raises(ConfigError, match="input image"):
        predict(_predict_cfg(ckpt, inp, inp, "overwrite=true"))


def test_predict_input_errors(tiny_model, tmp_path):
    _, ckpt = tiny_model
    with pytest.raises(DataError, match="does not exist"):
        predict(_predict_cfg(ckpt, tmp_path / "nope", tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        predict(_predict_cfg(ckpt, tmp_path / "empty", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
