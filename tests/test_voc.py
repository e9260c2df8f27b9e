import pytest
import torch

from ranprm.data.datamodule import DataConfig, VOCDataModule
from ranprm.data.voc import check_root, image_labels, read_annotation, read_instance_masks, read_split
from ranprm.errors import DataError
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
