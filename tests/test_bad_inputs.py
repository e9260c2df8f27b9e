"""Every bad input of issue 9 ends in a RanprmError whose message names the file or option (or is handled)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ranprm.cli.config import compose
from ranprm.data.voc import check_root, read_annotation, read_image, read_instance_masks, read_split
from ranprm.errors import CheckpointError, ConfigError, DataError
from ranprm.lightning.checkpoint import load_module
from ranprm.lightning.module import NonFiniteLossError, PRMModule
from ranprm.train import train
from tests.helpers import CLASSES
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
FIRST = "2024_000000"


def _run_cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    if "HYDRA_FULL_ERROR" not in env:
        environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "ranprm.train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
    )


# --- data.root -------------------------------------------------------------------------------------------------


def test_root_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(DataError, match=r"data\.root=.*nowhere.*is not a folder"):
        check_root(tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["JPEGImages", "Annotations", "ImageSets"])
def test_root_names_the_missing_folder(voc_root, missing):
    import shutil

    shutil.rmtree(voc_root / missing)
    with pytest.raises(DataError) as info:
        check_root(voc_root)
    message = str(info.value)
    assert f"lacks {missing}/" in message and "data.root=" in message
    others = {"JPEGImages", "Annotations", "ImageSets"} - {missing}
    assert not any(f"lacks {o}/" in message for o in others)


# --- split files -------------------------------------------------------------------------------------------------


def test_empty_split_file_is_named(voc_root):
    split = voc_root / "ImageSets" / "Main" / "train.txt"
    split.write_text("\n  \n")
    with pytest.raises(DataError, match=r"train\.txt lists no image ids"):
        read_split(voc_root, "Main", "train")


def test_missing_split_file_is_named(voc_root):
    with pytest.raises(DataError, match=r"nosuch\.txt does not exist.*'nosuch'"):
        read_split(voc_root, "Main", "nosuch")


def test_ids_without_image_are_named(voc_root):
    split = voc_root / "ImageSets" / "Main" / "train.txt"
    split.write_text(split.read_text() + "ghost_1\nghost_2\n")
    with pytest.raises(DataError, match=r"train\.txt lists 2 ids with no JPEGImages/<id>\.jpg \(first: 'ghost_1'\)"):
        read_split(voc_root, "Main", "train")


# --- images -------------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_truncated_jpeg_is_named_and_each_reader_says_its_own_way_out(voc_root):
    path = voc_root / "JPEGImages" / f"{FIRST}.jpg"
    _truncate(path)
    with pytest.raises(DataError, match=rf"image .*{FIRST}\.jpg is truncated or corrupt") as info:
        read_image(path)
    assert "skip_bad_images" not in str(info.value)  # ranprm-predict has no such option: the caller adds its own
    from ranprm.data.dataset import VOCDataset
    from ranprm.data.transforms import build_transform

    dataset = VOCDataset(voc_root, [FIRST], CLASSES, build_transform(32, train=False))
    with pytest.raises(DataError, match=rf"{FIRST}\.jpg is truncated or corrupt.*data\.skip_bad_images=true"):
        dataset[0]


def test_garbage_jpeg_is_named(voc_root):
    path = voc_root / "JPEGImages" / f"{FIRST}.jpg"
    path.write_bytes(b"not a jpeg at all" * 10)
    with pytest.raises(DataError, match=rf"{FIRST}\.jpg is truncated or corrupt"):
        read_image(path)


def test_training_stops_on_a_corrupt_image_by_default(voc_root, tmp_path):
    _truncate(voc_root / "JPEGImages" / f"{FIRST}.jpg")
    out = tmp_path / "out"
    cfg = compose("train", tiny_overrides(voc_root, out) + ["trainer.max_epochs=1"])
    with pytest.raises(DataError, match=rf"{FIRST}\.jpg is truncated or corrupt"):
        train(cfg)
    assert not (out / "metrics.json").exists()


def test_skip_bad_images_skips_warns_and_counts(voc_root, tmp_path, caplog):
    _truncate(voc_root / "JPEGImages" / f"{FIRST}.jpg")  # a training image (the first 6 are train)
    out = tmp_path / "out"
    cfg = compose("train", tiny_overrides(voc_root, out) + ["data.skip_bad_images=true"])
    with caplog.at_level("WARNING"):
        train(cfg)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 4  # batches of 3+2 kept images still make 2 steps per epoch
    assert summary["skipped_images"] == 2  # the same image, once per epoch
    text = caplog.text
    assert f"{FIRST}.jpg" in text and "skipping" in text
    assert "skipped 2 unreadable image loads" in text


def _source_and_expected(mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image in `mode` and the RGB pixels it shows, computed without PIL's converters where they could hide
    a wrong reading (palette lookup by hand, 16-bit grey scaled by 255 / 65535)."""
    rgb_array = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    rgb = Image.fromarray(rgb_array)
    if mode == "I;16":
        grey16 = (np.arange(20 * 30, dtype=np.float64).reshape(20, 30) * (65535 / 599)).round().astype(np.uint16)
        grey8 = np.rint(grey16 * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey16), np.repeat(grey8[..., None], 3, axis=2)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb_array, np.full((20, 30), 255, np.uint8)])), rgb_array
    if mode == "P":
        img = rgb.quantize(colors=16)
        palette = np.asarray(img.getpalette(), np.uint8).reshape(-1, 3)
        return img, palette[np.asarray(img)]
    if mode == "1":
        bits = np.random.default_rng(1).random((20, 30)) > 0.5
        return Image.fromarray(bits), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)
    img = rgb.convert(mode)  # L, CMYK: the reference is the image's own channels
    if mode == "L":
        return img, np.repeat(np.asarray(img)[..., None], 3, axis=2)
    cmyk = np.asarray(img).astype(np.float64)  # CMYK without a profile: RGB = 255 - C - K (PIL's naive rule)
    return img, np.clip(255 - cmyk[..., :3] - cmyk[..., 3:], 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", "jpg"), ("CMYK", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("1", "png")],
)
def test_grayscale_cmyk_rgba_16bit_palette_images_give_their_pixels(tmp_path, mode, suffix):
    img, expected = _source_and_expected(mode)
    path = tmp_path / f"x.{suffix}"
    img.save(path, **({"quality": 100} if suffix == "jpg" else {}))
    out = read_image(path)
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8
    error = np.abs(out.permute(1, 2, 0).numpy().astype(int) - expected.astype(int))
    if suffix == "png":
        assert error.max() == 0  # lossless: every pixel exact
    else:
        assert error.mean() < 3, error.mean()  # JPEG at quality 100: small rounding only


# --- annotations and masks ---------------------------------------------------------------------------------------


def test_xml_with_unknown_class_is_named(voc_root):
    path = voc_root / "Annotations" / f"{FIRST}.xml"
    path.write_text(path.read_text().replace("<name>square</name>", "<name>triangle</name>"))
    with pytest.raises(DataError, match=rf"{FIRST}\.xml has an object of unknown class 'triangle'.*data\.class_names"):
        read_annotation(path, CLASSES)


def test_xml_with_no_objects_is_named(voc_root):
    path = voc_root / "Annotations" / f"{FIRST}.xml"
    path.write_text("<annotation><filename>x.jpg</filename></annotation>")
    with pytest.raises(DataError, match=rf"{FIRST}\.xml has no <object>"):
        read_annotation(path, CLASSES)


def test_malformed_xml_is_named(voc_root):
    path = voc_root / "Annotations" / f"{FIRST}.xml"
    path.write_text("<annotation><object>")
    with pytest.raises(DataError, match=rf"{FIRST}\.xml is not valid VOC XML"):
        read_annotation(path, CLASSES)


def test_bad_annotation_stops_training_before_anything_is_written(voc_root, tmp_path):
    path = voc_root / "Annotations" / f"{FIRST}.xml"
    path.write_text(path.read_text().replace("<name>square</name>", "<name>triangle</name>"))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="unknown class 'triangle'"):
        train(compose("train", tiny_overrides(voc_root, out)))
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_mask_of_another_size_is_named(voc_root):
    path = voc_root / "SegmentationObject" / f"{FIRST}.png"
    with Image.open(path) as png:
        png.resize((32, 48), Image.NEAREST).save(path)
    with pytest.raises(DataError, match=rf"mask .*SegmentationObject/{FIRST}\.png is 32x48 but its image is 64x64"):
        read_instance_masks(voc_root, FIRST, (64, 64))


def test_rgb_mask_is_named(voc_root):
    path = voc_root / "SegmentationClass" / f"{FIRST}.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(DataError, match=rf"{FIRST}\.png has mode RGB"):
        read_instance_masks(voc_root, FIRST, (64, 64))


# --- network stride ----------------------------------------------------------------------------------------------


def _module(backbone: dict, num_classes: int = 2) -> PRMModule:
    cfg = compose("train", ["backbone=tiny"])
    from ranprm.cli.config import to_plain as _plain

    return PRMModule(
        class_names=list(CLASSES[:num_classes]) + [f"c{i}" for i in range(num_classes - 2)],
        backbone=backbone,
        head=_plain(cfg.head),
        optimizer=_plain(cfg.optimizer),
        threshold=_plain(cfg.threshold),
        prm=_plain(cfg.prm),
        retrieval=_plain(cfg.retrieval),
        eval=_plain(cfg.eval),
    )


def test_image_smaller_than_ran_stride_is_a_data_error():
    ran = {"name": "ran", "width": 8, "pretrained": None, "mask_grad": "full", "modules_per_stage": [1, 1, 1]}
    module = _module(ran)
    with pytest.raises(DataError, match=r"16x16 px is smaller than the network stride \(32 px\)"):
        module(torch.rand(1, 3, 16, 16))


def test_image_smaller_than_resnet_stride_is_a_data_error():
    module = _module({"name": "resnet50", "pretrained": False}).eval()
    with pytest.raises(DataError, match=r"16x16 px is smaller than the network stride \(32 px\)"):
        module(torch.rand(1, 3, 16, 16))


def test_image_of_at_least_one_stride_gives_a_finite_map():
    module = _module({"name": "tiny", "width": 8, "num_stages": 3, "pretrained": False}).eval()  # stride 8
    with torch.no_grad():
        crms = module(torch.rand(1, 3, 16, 16))
    assert crms.shape == (1, 2, 2, 2) and torch.isfinite(crms).all()


# --- configuration -----------------------------------------------------------------------------------------------


def test_unknown_group_value_lists_the_choices(tmp_path):
    proc = _run_cli(["backbone=nope"], tmp_path)
    assert proc.returncode != 0
    assert "nope" in proc.stderr
    for choice in ("ran", "resnet50", "tiny"):
        assert choice in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_unknown_option_is_named(tmp_path):
    proc = _run_cli(["data.no_such_key=1"], tmp_path)
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr


@pytest.mark.parametrize(
    ("override", "named"),
    [("prm.mode=exact", "prm.mode='exact'"), ("prm.precision=fp16", "prm.precision='fp16'"),
     ("callbacks.panels.precision=fp8", "callbacks.panels.precision='fp8'")],
)  # fmt: skip
def test_bad_inference_settings_stop_training_before_the_first_step(voc_root, tmp_path, override, named):
    """They are used only at the last epoch's evaluation and in the panels: their choices are the schema's, so the
    config does not even compose."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path), override]))
    assert not (tmp_path / "checkpoints").exists()


def test_cli_user_error_is_one_line_and_exit_2(tmp_path):
    args = ["data=voc", "data.root=/nonexistent/VOC2012", "backbone=tiny", "logger=none", "trainer=cpu"]
    proc = _run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ranprm: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0]
    assert "data.root='/nonexistent/VOC2012' is not a folder" in errors[0]
    assert "Traceback" not in proc.stderr


def test_cli_full_traceback_with_hydra_full_error(tmp_path):
    args = ["data=voc", "data.root=/nonexistent/VOC2012", "backbone=tiny", "logger=none", "trainer=cpu"]
    proc = _run_cli(args, tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "DataError" in proc.stderr
    assert "ranprm: error:" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=abc", r"optimizer\.lr='abc' must be a number"),
        ("optimizer.lr=-0.1", r"optimizer\.lr=-0\.1 must lie in \[0\.0, inf\]"),
        ("optimizer.weight_decay=-1", r"optimizer\.weight_decay=-1(\.0)? must lie in"),
        ("optimizer.scheduler=step", r"optimizer\.scheduler='step' must be one of none, cosine"),
        ("+optimizer.betas=[0.9]", r"optimizer='adam' cannot be built"),
        ("data.batch_size=0", r"data\.batch_size=0 must lie in \[1, inf\]"),
        ("data.batch_size=-1", r"data\.batch_size=-1 must lie in"),
        ("data.batch_size=x", r"data\.batch_size='x' must be an integer"),
        ("data.num_workers=-1", r"data\.num_workers=-1 must lie in \[0, inf\]"),
        ("data.image_size=4", r"data\.image_size=4 is smaller than the network stride"),
        ("trainer.max_epochs=-5", r"trainer\.max_epochs=-5 must be at least 1"),
        ("trainer.max_epochs=x", r"trainer\.max_epochs='x' must be an integer"),
        ("+trainer.no_such_arg=1", r"trainer\.no_such_arg is not a lightning\.Trainer argument"),
        ("+trainer.limit_train_batches=1.5", r"trainer\.limit_train_batches=1\.5 must lie in \[0, 1\.0\]"),
        ("trainer.accelerator=tpu9", r"trainer\.accelerator=.tpu9. is not valid; choose one of auto, gpu, cpu"),
        ("trainer.precision=fp8", r"trainer\.precision=.fp8. is not valid"),
        ("trainer.devices=0", r"trainer\.devices=0 must be at least 1"),
        ("seed=abc", r"seed='abc' must be an integer"),
        ("head.window=0", r"head\.window=0 must lie in \[1, inf\]"),
        ("eval.max_images=0", r"eval\.max_images=0 must lie in \[1, inf\]"),
        ("callbacks.progress_bar=fancy", r"callbacks\.progress_bar='fancy' must be one of rich, tqdm, none"),
        ("callbacks.checkpoint.save_top_k=x", r"callbacks\.checkpoint\.save_top_k='x' must be an integer"),
        ("callbacks.panels.num_images=-1", r"callbacks\.panels\.num_images=-1 must lie in"),
        ("overwrite=maybe", r"overwrite='maybe' must be true or false"),
    ],
)
def test_bad_values_stop_training_before_any_data_is_read(voc_root, tmp_path, override, message, monkeypatch):
    """Issue 18: each is one ConfigError naming the option, raised before the data's labels are read."""
    from ranprm.data.datamodule import VOCDataModule

    def no_reading(self, stage=None):
        raise AssertionError("the data was read before the bad value was found")

    monkeypatch.setattr(VOCDataModule, "setup", no_reading)
    with pytest.raises(ConfigError, match=message):
        train(compose("train", [*tiny_overrides(voc_root, tmp_path / "out"), override]))
    assert not (tmp_path / "out").exists()  # nothing was created either


def test_a_backbone_value_of_the_wrong_type_fails_when_the_config_is_composed(voc_root, tmp_path):
    """The backbone's options are typed dataclass fields (ranprm.models.registry), checked by Hydra at compose time."""
    with pytest.raises(ConfigError, match=r"^backbone\.width='abc' must be an integer$"):
        compose("train", [*tiny_overrides(voc_root, tmp_path / "out"), "backbone.width=abc"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("entry", "args", "named"),
    [
        ("ranprm.train", ["optimizer.lr=abc"], "optimizer.lr='abc' must be a number"),
        ("ranprm.train", ["data.batch_size=x"], "data.batch_size='x' must be an integer"),
        ("ranprm.predict", ["ckpt=x.ckpt", "input=.", "output=o", "image_size=abc"], "image_size='abc' must be"),
        ("ranprm.predict", [], "are required"),
    ],
)
def test_bad_values_on_the_command_line_are_one_line_and_exit_2(tmp_path, entry, args, named):
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    environ.pop("HYDRA_FULL_ERROR", None)
    base = ["backbone=tiny", "logger=none", "trainer=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(
        [sys.executable, "-m", entry, *(base if entry == "ranprm.train" else []), *args],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ranprm: error:") and named in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_mask_switch_on_a_backbone_without_masks_is_named(trained_ckpt):
    with pytest.raises(ConfigError, match=r"backbone_overrides\.mask_grad=detached: the checkpoint's backbone 'tiny' "
                       r"has no setting 'mask_grad' \(its settings: num_stages, width\)"):  # fmt: skip
        load_module(trained_ckpt, backbone_overrides={"mask_grad": "detached"})


@pytest.mark.parametrize(
    "score",
    ["1" + "0" * 400, "1" + "0" * 5000, "1e400", "-1e999"],
    ids=["400-digit", "5000-digit", "float-overflow", "minus-inf"],
)
def test_a_huge_score_in_a_results_file_is_one_line(tmp_path, score):
    from ranprm.errors import PredictionsError
    from ranprm.eval.results_io import read_results

    path = tmp_path / "p.json"
    path.write_text('[{"image_id": "a", "category_id": 1, "score": ' + score + ', "segmentation": {}}]')
    with pytest.raises(PredictionsError, match=r"p\.json"):
        read_results(path, CLASSES, {"a": (4, 4)})


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    from tests.helpers import write_voc

    base = tmp_path_factory.mktemp("ckpt")
    voc = write_voc(base / "VOC2012")
    out = base / "out"
    train(compose("train", tiny_overrides(voc, out) + ["trainer.max_epochs=1"]))
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_for_other_classes_names_both(trained_ckpt):
    with pytest.raises(CheckpointError, match=r"trained on 2 classes \['square', 'disk'\].*data has 3 classes"):
        load_module(trained_ckpt, class_names=("square", "disk", "star"))


def test_checkpoint_from_another_backbone_is_named(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["backbone"] = {"name": "tiny", "width": 8, "num_stages": 2, "pretrained": False}
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(CheckpointError, match=r"other\.ckpt: weights do not fit backbone 'tiny'"):
        load_module(other, class_names=CLASSES)


def test_checkpoint_with_other_class_count_weights_is_named(trained_ckpt, tmp_path):
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    w = ckpt["state_dict"]["model.classifier.weight"]
    ckpt["state_dict"]["model.classifier.weight"] = torch.cat([w, w[:1]])
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: weights do not fit"):
        load_module(bad, class_names=CLASSES)


def test_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"ckpt='.*nope\.ckpt': no such file"):
        load_module(tmp_path / "nope.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a ranprm training checkpoint"):
        load_module(foreign)
    text = tmp_path / "text.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_module(text)


def _resume_from(voc_root: Path, out: Path, ckpt: Path) -> None:
    train(compose("train", [*tiny_overrides(voc_root, out), f"ckpt_path={ckpt}"]))


def test_training_from_a_missing_truncated_crafted_or_weights_only_checkpoint_is_one_line(
    voc_root, tmp_path, trained_ckpt
):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"ckpt_path='.*nope\.ckpt': no such file"):
        _resume_from(voc_root, out, tmp_path / "nope.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained_ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt: cannot be read safely"):
        _resume_from(voc_root, out, truncated)
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Evil(marker)}, crafted)
    with pytest.raises(CheckpointError, match=r"crafted\.ckpt: cannot be read safely"):
        _resume_from(voc_root, out, crafted)
    assert not marker.exists()
    weights = tmp_path / "weights.ckpt"
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters")}, weights)
    with pytest.raises(CheckpointError, match=r"weights\.ckpt: not a ranprm training checkpoint that can be resumed "
                       r"\(it lacks optimizer_states, loops, global_step, epoch\)"):  # fmt: skip
        _resume_from(voc_root, out, weights)
    assert not out.exists()  # refused before anything was written


def test_resuming_with_another_architecture_is_named(voc_root, tmp_path, trained_ckpt):
    overrides = [*tiny_overrides(voc_root, tmp_path / "out"), f"ckpt_path={trained_ckpt}", "backbone.width=8"]
    with pytest.raises(ConfigError, match=r"trained with backbone\.width=16, this run sets 8"):
        train(compose("train", overrides))


# --- non-finite loss ---------------------------------------------------------------------------------------------


class _NanLoss(torch.nn.Module):
    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits.sum() * math.nan


def test_nan_loss_stops_with_step_and_images_and_keeps_last_good_checkpoint(voc_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = PRMModule.training_step

    def poisoned(self, batch, batch_idx):
        if self.current_epoch == 1:  # epoch 0 trains and checkpoints; epoch 1's first loss is NaN
            self.loss_fn = _NanLoss()
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PRMModule, "training_step", poisoned)
    cfg = compose("train", tiny_overrides(voc_root, out) + ["trainer.max_epochs=3"])
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    message = str(info.value)
    assert "loss is nan at global step 2 (batch 0, images" in message and "2024_" in message
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (out / "metrics.json").exists()


# --- no valid peaks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold",
    [
        {"classes": {"kind": "fixed", "value": 1e9}, "peaks": {"kind": "fixed", "value": 0.0}},  # no valid class
        {"classes": {"kind": "fixed", "value": -1e9}, "peaks": {"kind": "fixed", "value": 1e9}},  # no valid peak
    ],
)
def test_no_valid_peaks_gives_empty_predictions(threshold):
    module = _module({"name": "tiny", "width": 8, "num_stages": 3, "pretrained": False})
    module.hparams.threshold = {"name": "fixed", "min_class_prob": 0.0, **threshold}
    sizes = [(64, 64), (50, 70)]
    predictions = module.predict_images(torch.rand(2, 3, 64, 64), sizes)
    assert len(predictions) == 2
    for pred, size in zip(predictions, sizes, strict=True):
        assert len(pred.instances) == 0
        assert pred.peaks.shape[0] == 0
        assert tuple(pred.instances.masks.shape[-2:]) == size


# --- safety ------------------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this would create `marker`: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["top", "hyper_parameters", "state_dict"])
def test_crafted_pickle_is_refused_without_running_code(tmp_path, where):
    from ranprm.lightning.checkpoint import read_checkpoint
    from ranprm.models.weights import read_state_dict

    marker = tmp_path / "pwned"
    evil = _Evil(marker)
    payload = {
        "top": evil,
        "hyper_parameters": {"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": evil},
        "state_dict": {"state_dict": {"w": evil}, "hyper_parameters": {}},
    }[where]
    path = tmp_path / "evil.ckpt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: cannot be read safely"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: cannot be read safely"):
        read_state_dict(path)
    with pytest.raises(CheckpointError):
        load_module(path)
    assert not marker.exists()


_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
    + "]><annotation><object><name>&lol9;</name></object></annotation>"
)


@pytest.mark.parametrize(
    "text",
    [
        _LAUGHS,
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        "<annotation><object><name>&x;</name></object></annotation>",
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "square">]><annotation><object><name>&x;</name></object>'
        "</annotation>",
    ],
    ids=["billion-laughs", "external-entity", "any-entity"],
)
def test_xml_entities_are_refused(tmp_path, text):
    path = tmp_path / "evil.xml"
    path.write_text(text)
    with pytest.raises(DataError, match=r"evil\.xml is not valid VOC XML"):
        read_annotation(path, CLASSES)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes (no pixel data): a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, as VOC masks are
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [12_000, 60_000])  # over PIL's warning limit; over its error limit
def test_decompression_bomb_image_is_refused(tmp_path, side):
    from ranprm.data.voc import _read_index_png

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(side, side))
    assert Image.MAX_IMAGE_PIXELS is not None and side * side > Image.MAX_IMAGE_PIXELS  # PIL's limit is kept
    with pytest.raises(DataError, match=r"bomb\.png is larger than PIL's decompression-bomb limit"):
        read_image(path)
    with pytest.raises(DataError, match=r"bomb\.png"):
        _read_index_png(path)


def test_pil_limit_applies_to_real_images(voc_root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 px > 2 * 1000: PIL's hard error
    with pytest.raises(DataError, match="decompression-bomb limit"):
        read_image(voc_root / "JPEGImages" / f"{FIRST}.jpg")
