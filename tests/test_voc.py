import re

import numpy as np
import pytest
import torch
from PIL import Image

from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.data.voc import check_root, image_labels, read_annotation, read_instance_masks, read_split
from ranprm.errors import ConfigError, DataError
from tests.helpers import CLASSES


def test_split_labels_and_difficult(voc_root):
    ids = read_split(voc_root, "Main", "train")
    assert ids == [f"2024_{i:06d}" for i in range(6)]
    objects = read_annotation(voc_root / "Annotations" / f"{ids[0]}.xml", CLASSES)
    assert [(o.name, o.difficult) for o in objects] == [("square", True)]
    assert image_labels(objects, CLASSES, difficult_as_positive=True).tolist() == [1.0, 0.0]
    assert image_labels(objects, CLASSES, difficult_as_positive=False).tolist() == [0.0, 0.0]
    objects = read_annotation(voc_root / "Annotations" / f"{ids[1]}.xml", CLASSES)
    assert image_labels(objects, CLASSES).tolist() == [1.0, 1.0]


def test_instance_masks_and_void(voc_root):
    targets = read_instance_masks(voc_root, "2024_000001", (64, 64))
    assert targets is not None
    assert targets.labels.tolist() == [0, 1]
    assert targets.masks.shape == (2, 64, 64)
    assert targets.masks[0].sum() == 20 * 20
    # the void band touches every object but never overlaps one
    assert targets.void.any()
    assert not (targets.void & targets.masks.any(0)).any()
    grown = torch.nn.functional.max_pool2d(targets.masks.float()[None], 3, 1, 1)[0].bool().any(0)
    assert (targets.void <= grown).all()


def test_missing_folders_are_named(tmp_path, voc_root):
    with pytest.raises(DataError, match="is not a folder"):
        check_root(tmp_path / "nope")
    (voc_root / "Annotations").rename(voc_root / "Annot")
    with pytest.raises(DataError, match="lacks Annotations/"):
        check_root(voc_root)


def test_unknown_class_is_named(voc_root):
    with pytest.raises(DataError, match="unknown class 'disk'"):
        read_annotation(voc_root / "Annotations" / "2024_000001.xml", ("square",))


def test_datamodule_fractions_holdout_and_batches(voc_root):
    cfg = DataConfig(root=str(voc_root), class_names=list(CLASSES), image_size=32, batch_size=4, num_workers=0)
    dm = VOCDataModule(cfg)
    assert dm.class_names == CLASSES
    train, val = dm.split_ids()
    assert len(train) == 6 and len(val) == 2
    cfg.train_fraction, cfg.holdout_fraction = 0.5, 0.34
    train, val = VOCDataModule(cfg).split_ids()
    assert train == ["2024_000000", "2024_000001"] and val == ["2024_000002"]
    cfg.train_fraction, cfg.holdout_fraction = 1.0, 0.0
    dm = VOCDataModule(cfg)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, 2)
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["targets"][0].masks.shape[-2:] == (64, 64)  # GT stays at the original size


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_read_image_gives_the_same_pixels_as_pil_for_every_jpeg_mode(tmp_path, mode):
    """RGB and grayscale JPEGs take torchvision's decoder and CMYK takes PIL's: the pixels are PIL's either way."""
    import numpy as np
    from PIL import Image

    from ranprm.data.voc import read_image

    rng = np.random.default_rng(0)
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode).save(path, quality=90)
    with Image.open(path) as img:
        expected = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 37, 53)
    assert torch.equal(image, expected)


# --- image modes: every PIL mode an image file can carry, checked pixel by pixel -------------------------------------

BG = (124, 116, 104)  # ALPHA_BACKGROUND: ImageNet's mean colour


def _composite(rgb: tuple[int, int, int], alpha: int) -> list[int]:
    """Alpha compositing onto the fixed background, by hand: round(a * colour + (1 - a) * background)."""
    a = alpha / 255
    return [int(np.floor(a * c + (1 - a) * b + 0.5)) for c, b in zip(rgb, BG, strict=True)]


def _pixels(path) -> list[list[list[int]]]:
    from ranprm.data.voc import read_image

    image = read_image(path)
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    return image.permute(1, 2, 0).tolist()


def test_alpha_is_composited_on_the_mean_colour(tmp_path):
    from ranprm.data.voc import ALPHA_BACKGROUND

    assert ALPHA_BACKGROUND == BG
    rgba = np.array([[[255, 0, 0, 255], [0, 255, 0, 0]], [[0, 0, 255, 128], [10, 20, 30, 64]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert _pixels(tmp_path / "a.png") == [
        [[255, 0, 0], list(BG)],  # opaque: its colour; transparent: the background, not the hidden green
        [_composite((0, 0, 255), 128), _composite((10, 20, 30), 64)],
    ]
    assert _composite((0, 0, 255), 128) == [62, 58, 180]  # 128/255 of blue over the mean colour, worked out


def test_grey_with_alpha_and_palette_with_a_transparent_colour(tmp_path):
    la = np.array([[[200, 255], [200, 0]]], np.uint8)  # (1, 2, 2): grey 200, opaque then transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert _pixels(tmp_path / "la.png") == [[[200, 200, 200], list(BG)]]

    palette = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * 759)
    palette.save(tmp_path / "p.png", transparency=1)  # colour 1 (red) is transparent
    assert _pixels(tmp_path / "p.png") == [[[10, 20, 30], list(BG), [0, 0, 250]]]


def test_bilevel_16_bit_32_bit_and_float_grey_are_scaled_to_8_bits(tmp_path):
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "one.png")
    assert _pixels(tmp_path / "one.png") == [[[255] * 3, [0] * 3]]

    grey16 = np.array([[0, 257, 32896, 65535]], np.uint16)  # 257 = one 8-bit step; 32896 = 128 * 257
    Image.fromarray(grey16).save(tmp_path / "i16.png")
    assert _pixels(tmp_path / "i16.png") == [[[0] * 3, [1] * 3, [128] * 3, [255] * 3]]

    grey32 = np.array([[0, 65535, 70000, -5]], np.int32)  # mode I (TIFF): 16-bit scale, outside 0..65535 clipped
    Image.fromarray(grey32, "I").save(tmp_path / "i32.tif")
    assert _pixels(tmp_path / "i32.tif") == [[[0] * 3, [255] * 3, [255] * 3, [0] * 3]]

    grey_f = np.array([[0.0, 127.6, 300.0, -2.0, np.nan]], np.float32)  # mode F (TIFF): 0..255, rounded, clipped
    Image.fromarray(grey_f, "F").save(tmp_path / "f.tif")
    assert _pixels(tmp_path / "f.tif") == [[[0] * 3, [128] * 3, [255] * 3, [0] * 3, [0] * 3]]


def test_lab_uses_pils_conversion_and_a_failed_conversion_names_the_mode(tmp_path, monkeypatch):
    from ranprm.data.voc import read_image

    Image.new("LAB", (2, 1), (128, 128, 128)).save(tmp_path / "lab.tif")  # L = 50 of 100, a = b = 0: mid grey
    assert _pixels(tmp_path / "lab.tif") == [[[119] * 3] * 2]

    Image.new("CMYK", (4, 3)).save(tmp_path / "cmyk.tif")

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(DataError, match=r"cmyk\.tif has PIL mode CMYK, which ranprm cannot convert to RGB"):
        read_image(tmp_path / "cmyk.tif")


# --- split files ---------------------------------------------------------------------------------------------------


def test_duplicated_id_is_named_with_both_lines(voc_root):
    split = voc_root / "ImageSets" / "Main" / "train.txt"
    split.write_text("2024_000000\n2024_000001\n\n2024_000000\n")
    with pytest.raises(DataError, match=r"train\.txt lists the id '2024_000000' twice \(lines 1 and 4\)"):
        read_split(voc_root, "Main", "train")


@pytest.mark.parametrize("bad", ["../2024_000000", "sub/2024_000000", ".hidden"])
def test_an_id_with_a_folder_is_refused(voc_root, bad):
    (voc_root / "ImageSets" / "Main" / "train.txt").write_text(f"2024_000000\n{bad}\n")
    with pytest.raises(DataError, match=rf"train\.txt line 2: '{re.escape(bad)}' is not an image id"):
        read_split(voc_root, "Main", "train")


def test_a_binary_split_file_is_one_line(voc_root):
    (voc_root / "ImageSets" / "Main" / "train.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"train\.txt cannot be read as text"):
        read_split(voc_root, "Main", "train")


# --- masks are checked from their headers when the data is set up, before any training ---------------------------


def _setup(voc_root):
    cfg = DataConfig(root=str(voc_root), class_names=list(CLASSES), image_size=32, batch_size=2, num_workers=0)
    VOCDataModule(cfg).setup("fit")


def test_missing_mask_of_the_evaluated_split_stops_setup(voc_root):
    (voc_root / "SegmentationObject" / "2024_000007.png").unlink()
    with pytest.raises(DataError, match=r"mask .*SegmentationObject/2024_000007\.png does not exist.*Segmentation/val"):
        _setup(voc_root)


def test_missing_class_mask_stops_setup(voc_root):
    (voc_root / "SegmentationClass" / "2024_000006.png").unlink()
    with pytest.raises(DataError, match=r"SegmentationObject/2024_000006\.png has no matching .*SegmentationClass"):
        _setup(voc_root)


def test_mask_size_and_mode_are_read_from_the_header(voc_root, monkeypatch):
    import ranprm.data.voc as voc

    path = voc_root / "SegmentationClass" / "2024_000006.png"
    with Image.open(path) as png:
        png.resize((64, 48)).save(path)
    decoded = []
    monkeypatch.setattr(np, "asarray", lambda *a, **k: decoded.append(1) or np.array(*a, **k))
    with pytest.raises(DataError, match=r"SegmentationClass/2024_000006\.png is 64x48 but its image is 64x64"):
        voc.check_masks(voc_root, ["2024_000006"], required=True, split_name="val")
    assert not decoded  # no pixel was decoded: the header says it all
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(DataError, match=r"2024_000006\.png has mode RGB"):
        _setup(voc_root)


def test_a_hold_out_from_a_main_split_needs_no_masks(voc_root):
    import shutil

    shutil.rmtree(voc_root / "SegmentationObject")
    cfg = DataConfig(root=str(voc_root), class_names=list(CLASSES), image_size=32, holdout_fraction=0.34,
                     num_workers=0)  # fmt: skip
    VOCDataModule(cfg).setup("fit")  # no error: VOC's Main images mostly have no masks


# --- config values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", 0, r"data\.batch_size=0 must lie in \[1, inf\]"),
        ("batch_size", -1, r"data\.batch_size=-1 must lie in"),
        ("batch_size", "x", r"data\.batch_size='x' must be an integer"),
        ("batch_size", 2.5, r"data\.batch_size=2\.5 must be an integer"),
        ("num_workers", -2, r"data\.num_workers=-2 must lie in \[0, inf\]"),
        ("image_size", "abc", r"data\.image_size='abc' must be an integer"),
        ("flip_prob", 1.5, r"data\.flip_prob=1\.5 must lie in \[0\.0, 1\.0\]"),
        ("pin_memory", "yes", r"data\.pin_memory='yes' must be true or false"),
        ("train_fraction", 0.0, r"data\.train_fraction=0\.0 must lie in \(0\.0, 1\.0\]"),
        ("root", "???", r"data\.root is required"),
        ("class_names", ["a", "a"], r"data\.class_names=\['a', 'a'\] lists a class twice"),
    ],
)
def test_bad_data_values_are_named_before_anything_is_read(key, value, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig.from_config({"root": "/nonexistent", key: value})


def test_num_workers_above_the_usable_cores_is_capped(voc_root, caplog):
    from ranprm.data.datamodule import usable_cores

    cfg = DataConfig(root=str(voc_root), class_names=list(CLASSES), num_workers=usable_cores() + 3)
    with caplog.at_level("INFO", logger="ranprm.data.datamodule"):
        dm = VOCDataModule(cfg)
    assert dm.num_workers == usable_cores()
    assert [r.levelname for r in caplog.records] == ["INFO"] and "capped" in caplog.text


# --- the training order: a function of (seed, epoch), resumable mid-epoch ------------------------------------------


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    from ranprm.data.sampling import EpochSampler, sample_seed

    data = list(range(10))
    first = list(EpochSampler(data, seed=3))
    assert sorted(i for i, _ in first) == data
    assert list(EpochSampler(data, seed=3)) == first  # whatever the global generator did in between
    torch.rand(100)
    assert list(EpochSampler(data, seed=3)) == first
    other = EpochSampler(data, seed=3)
    other.set_epoch(1)
    assert [i for i, _ in other] != [i for i, _ in first]
    assert [s for _, s in first] == [sample_seed(3, 0, i) for i, _ in first]
    assert sample_seed(3, 0, 1) != sample_seed(3, 1, 0)


def test_epoch_sampler_resumes_after_the_batches_already_trained():
    from ranprm.data.sampling import EpochSampler

    data = list(range(10))
    full = EpochSampler(data, seed=0)
    full.set_epoch(2)
    order = list(full)
    resumed = EpochSampler(data, seed=0)
    resumed.resume_at(epoch=2, batches_done=2, batch_size=3)
    assert list(resumed) == order[6:]
    assert list(resumed) == order  # the skip applies once
    finished = EpochSampler(data, seed=0)
    finished.resume_at(epoch=2, batches_done=4, batch_size=3)  # 4 batches of 3 cover all 10: the epoch was done
    nxt = EpochSampler(data, seed=0)
    nxt.set_epoch(3)
    assert finished.epoch == 3 and list(finished) == list(nxt)


def test_a_flip_is_a_function_of_the_sample_seed(voc_root):
    cfg = DataConfig(root=str(voc_root), class_names=list(CLASSES), image_size=32, flip_prob=0.5, num_workers=0)
    dm = VOCDataModule(cfg)
    dm.setup("fit")
    flips = {}
    for seed in range(8):
        a = dm.train_set[(1, seed)]["image"]
        torch.rand(7)  # the global generator moves; the sample must not
        assert torch.equal(dm.train_set[(1, seed)]["image"], a)
        flips[seed] = not torch.equal(a, dm.train_set[(1, 0)]["image"])
    assert set(flips.values()) == {True, False}  # both outcomes occur: the seed decides


def test_workers_ignore_sigterm_and_chain_the_seeding_init():
    import signal

    from ranprm.data.sampling import worker_init

    called = []
    before = signal.getsignal(signal.SIGTERM)
    try:
        worker_init(3, chained=called.append)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert called == [3]


@pytest.mark.parametrize(
    ("synthetic", "message"),
    [({"num_train": "abc"}, r"data\.synthetic\.num_train='abc' must be an integer"),
     ({"foo": 1}, r"data\.synthetic\.foo is not an option; known options: num_train"),
     ({"object_scale": [0.1]}, r"data\.synthetic\.object_scale=\[0\.1\] must be a list of 2 values"),
     ({"num_val": 0}, r"data\.synthetic: num_train and num_val must be >= 1")],
)  # fmt: skip
def test_bad_synthetic_spec_values_are_named_before_anything_is_generated(synthetic, message):
    with pytest.raises(ConfigError, match=message):
        VOCDataModule(DataConfig.from_config({"root": None, "synthetic": synthetic}))
