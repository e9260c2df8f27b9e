"""The embedded dataset: VOC layout, masks that agree with the XML, the void band, caching, determinism."""

from __future__ import annotations

import collections
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ranprm.data import synthetic
from ranprm.data.synthetic import (
    CLASS_NAMES,
    VOID,
    SyntheticSpec,
    dataset_dir,
    ensure_dataset,
    render_sample,
    voc_palette,
)
from ranprm.errors import ConfigError

SMALL = SyntheticSpec(num_train=8, num_val=4, image_size=96, seed=3)
SUBDIRS = ("JPEGImages", "Annotations", "SegmentationObject", "SegmentationClass")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_dataset(SMALL, tmp_path_factory.mktemp("cache"))


def _ids(root: Path, task: str, split: str) -> list[str]:
    return [line.split()[0] for line in (root / "ImageSets" / task / f"{split}.txt").read_text().splitlines()]


def _objects(root: Path, image_id: str) -> tuple[tuple[int, int], list[dict]]:
    tree = ET.parse(root / "Annotations" / f"{image_id}.xml").getroot()
    size = (int(tree.findtext("size/width")), int(tree.findtext("size/height")))
    objects = []
    for obj in tree.iter("object"):
        box = tuple(int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append({"name": obj.findtext("name"), "difficult": obj.findtext("difficult") == "1", "box": box})
    return size, objects


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "P", f"{path} is {img.mode}, VOC masks are palette PNGs"
        assert img.getpalette()[: 3 * 256] == voc_palette()
        return np.asarray(img).copy()


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_complete_voc(root: Path) -> None:
    for sub in (*SUBDIRS, "ImageSets/Main", "ImageSets/Segmentation"):
        assert (root / sub).is_dir(), sub
    train, val = _ids(root, "Main", "train"), _ids(root, "Main", "val")
    assert len(train) == SMALL.num_train and len(val) == SMALL.num_val and not set(train) & set(val)
    assert _ids(root, "Main", "trainval") == train + val
    assert _ids(root, "Segmentation", "train") == train and _ids(root, "Segmentation", "val") == val
    for image_id in train + val:
        for sub, ext in zip(SUBDIRS, ("jpg", "xml", "png", "png"), strict=True):
            assert (root / sub / f"{image_id}.{ext}").is_file(), f"{sub}/{image_id}.{ext}"
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as img:
            assert (img.format, img.mode) == ("JPEG", "RGB")
            assert img.size == _objects(root, image_id)[0]
    assert (root / "spec.json").is_file()


def test_per_class_lists_follow_voc(root: Path) -> None:
    for name in CLASS_NAMES:
        lines = (root / "ImageSets" / "Main" / f"{name}_trainval.txt").read_text().splitlines()
        assert [line.split()[0] for line in lines] == _ids(root, "Main", "trainval")
        for line in lines:
            image_id, flag = line[:-3], int(line[-2:])  # VOC: id, one space, flag right-aligned in 2 columns
            objs = [o for o in _objects(root, image_id)[1] if o["name"] == name]
            expected = -1 if not objs else (0 if all(o["difficult"] for o in objs) else 1)
            assert flag == expected, line


def test_masks_agree_with_xml(root: Path) -> None:
    for image_id in _ids(root, "Main", "trainval"):
        (width, height), objects = _objects(root, image_id)
        inst = _png(root / "SegmentationObject" / f"{image_id}.png")
        cls = _png(root / "SegmentationClass" / f"{image_id}.png")
        assert inst.shape == cls.shape == (height, width)
        assert 1 <= len(objects) <= SMALL.max_instances
        ids = sorted(set(np.unique(inst).tolist()) - {0, VOID})
        assert ids == list(range(1, len(objects) + 1)), image_id
        assert np.array_equal(inst == VOID, cls == VOID) and np.array_equal(inst == 0, cls == 0)
        for k, obj in enumerate(objects, start=1):
            region = inst == k
            classes = np.unique(cls[region])
            assert classes.tolist() == [CLASS_NAMES.index(obj["name"]) + 1], (image_id, k)
            ys, xs = np.nonzero(region)
            tight = (
                xs.min() + 1,
                ys.min() + 1,
                xs.max() + 1,
                ys.max() + 1,
            )  # VOC boxes are 1-based, inclusive
            assert np.abs(np.subtract(obj["box"], tight)).max() <= 1, (image_id, k, obj["box"], tight)


def test_void_band_surrounds_every_object_and_nothing_else(root: Path) -> None:
    for image_id in _ids(root, "Main", "trainval"):
        inst = _png(root / "SegmentationObject" / f"{image_id}.png")
        void = inst == VOID
        padded = np.pad(inst, 1, constant_values=VOID)
        neighbours = [padded[1 + dy : 1 + dy + inst.shape[0], 1 + dx : 1 + dx + inst.shape[1]] for dy, dx in
                      ((-1, 0), (1, 0), (0, -1), (0, 1))]  # fmt: skip
        for k in range(1, int(inst[~void].max()) + 1):
            # Every instance touches the band, and no instance pixel touches another label directly.
            region = inst == k
            assert any((region & (n == VOID)).any() for n in neighbours), (image_id, k)
            for n in neighbours:
                assert not (region & (n != k) & (n != VOID)).any(), (image_id, k)
        # Every piece of void borders an instance, and lies close to one: the thin parts of an object (tips,
        # slivers along the frame) may vanish into the band whole, as in VOC, hence the loose distance.
        core = ((inst != 0) & ~void).astype(np.uint8)
        n_parts, parts = cv2.connectedComponents(void.astype(np.uint8), connectivity=8)
        touching = np.unique(parts[cv2.dilate(core, np.ones((3, 3), np.uint8)).astype(bool) & void])
        assert set(touching.tolist()) == set(range(1, n_parts)), image_id
        distance = cv2.distanceTransform(1 - core, cv2.DIST_L2, 5)
        assert distance[void].max() <= 4 * SMALL.void_width, image_id


def test_reader_sees_the_same_instances(root: Path) -> None:
    from ranprm.data.voc import read_annotation, read_instance_masks

    for image_id in _ids(root, "Segmentation", "val"):
        objects = read_annotation(root / "Annotations" / f"{image_id}.xml", CLASS_NAMES)
        (width, height), _ = _objects(root, image_id)
        targets = read_instance_masks(root, image_id, (height, width))
        assert targets is not None
        assert [CLASS_NAMES[i] for i in targets.labels.tolist()] == [o.name for o in objects]
        assert targets.void.any()


def test_deterministic_and_reused(tmp_path: Path, root: Path) -> None:
    again = ensure_dataset(SMALL, tmp_path / "other")
    assert again != root
    assert _all_files(again) == _all_files(root)
    stamp = (again / "spec.json").stat().st_mtime_ns
    (again / "marker").write_text("kept")
    assert ensure_dataset(SMALL, tmp_path / "other") == again
    assert (again / "marker").exists() and (again / "spec.json").stat().st_mtime_ns == stamp


def test_regenerated_when_spec_or_version_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(SMALL, num_train=2, num_val=1)
    first = ensure_dataset(spec, tmp_path)
    other = ensure_dataset(dataclasses.replace(spec, seed=4), tmp_path)
    assert other != first and (other / "spec.json").is_file()
    jpg = "JPEGImages/train_00000.jpg"
    assert (other / jpg).read_bytes() != (first / jpg).read_bytes()
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    bumped = ensure_dataset(spec, tmp_path)
    assert bumped not in (first, other) and (bumped / jpg).is_file()


def test_val_images_do_not_depend_on_num_train(tmp_path: Path) -> None:
    a = ensure_dataset(dataclasses.replace(SMALL, num_train=1, num_val=2), tmp_path)
    b = ensure_dataset(dataclasses.replace(SMALL, num_train=3, num_val=2), tmp_path)
    for name in ("JPEGImages/val_00001.jpg", "SegmentationObject/val_00001.png", "Annotations/val_00001.xml"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_killed_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(SMALL, num_train=2, num_val=1)

    def die(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_lists", die)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(spec, tmp_path)
    target = dataset_dir(spec, tmp_path)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.tmp-*"))
    monkeypatch.undo()
    assert synthetic.is_complete(ensure_dataset(spec, tmp_path), spec)


def test_damaged_dataset_is_rebuilt(tmp_path: Path) -> None:
    spec = dataclasses.replace(SMALL, num_train=2, num_val=1)
    target = ensure_dataset(spec, tmp_path)
    (target / "JPEGImages" / "val_00000.jpg").unlink()
    assert ensure_dataset(spec, tmp_path) == target
    assert (target / "JPEGImages" / "val_00000.jpg").is_file()


def test_loser_of_a_race_uses_the_winners_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(SMALL, num_train=2, num_val=1)
    target = dataset_dir(spec, tmp_path)
    real_generate = synthetic.generate

    def generate_while_another_wins(spec_: SyntheticSpec, root: Path, workers: int = 1) -> Path:
        real_generate(spec_, target)  # the other process renames its folder in first
        (target / "winner").write_text("")
        return real_generate(spec_, root, workers)

    monkeypatch.setattr(synthetic, "generate", generate_while_another_wins)
    assert ensure_dataset(spec, tmp_path) == target
    assert (target / "winner").exists() and not list(tmp_path.rglob(".*.tmp-*"))


def test_cache_dir_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANPRM_CACHE", str(tmp_path))
    assert dataset_dir(SMALL) == tmp_path / "synthetic" / SMALL.key()


def test_task_statistics_over_a_sample() -> None:
    spec = SyntheticSpec(num_train=120, num_val=1, image_size=80, seed=11)
    counts, classes = collections.Counter(), collections.Counter()
    repeats = difficult = truncated = 0
    sizes = set()
    for i in range(spec.num_train):
        sample = render_sample(spec, "train", i)
        names = [o.name for o in sample.objects]
        counts[len(names)] += 1
        classes.update(names)
        repeats += len(set(names)) < len(names)
        difficult += sum(o.difficult for o in sample.objects)
        truncated += sum(o.truncated for o in sample.objects)
        sizes.add(sample.image.shape[:2])
    assert len(CLASS_NAMES) >= 6 and set(classes) == set(CLASS_NAMES)
    assert set(counts) == {1, 2, 3, 4}
    assert repeats >= 10 and difficult >= 1 and truncated >= 1
    mean = sum(classes.values()) / len(CLASS_NAMES)
    assert all(0.6 * mean <= c <= 1.4 * mean for c in classes.values()), classes
    assert difficult <= 0.2 * sum(classes.values())
    assert len(sizes) > 20  # sizes vary, so readers must resize


def test_spec_validation_and_yaml_lists() -> None:
    assert SyntheticSpec(object_scale=[0.1, 0.2]).object_scale == (0.1, 0.2)  # type: ignore[arg-type]
    assert hash(SyntheticSpec()) == hash(SyntheticSpec())
    for bad in ({"num_train": 0}, {"void_width": 3}, {"max_instances": 0}, {"object_scale": (0.3, 0.2)}):
        with pytest.raises(ConfigError):
            SyntheticSpec(**bad)  # type: ignore[arg-type]


def test_objects_wear_their_class_hue_and_random_colours_when_switched_off():
    """With class_colours each instance's pixels sit near its CLASS_HUES entry; without, hues spread out."""

    def hue_errors(spec):
        errors = []
        for index in range(6):
            sample = synthetic.render_sample(spec, "train", index)
            hsv = cv2.cvtColor(sample.image, cv2.COLOR_RGB2HSV_FULL).astype(np.float64)
            for slot, obj in enumerate(sample.objects, start=1):
                hue = hsv[..., 0][sample.instances == slot] * 360.0 / 256.0
                angle = np.deg2rad(hue)
                mean = np.rad2deg(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()))
                errors.append(abs((mean - synthetic.CLASS_HUES[obj.name] + 180.0) % 360.0 - 180.0))
        return np.array(errors)

    coloured = hue_errors(synthetic.SyntheticSpec(num_train=6, num_val=1))
    random = hue_errors(synthetic.SyntheticSpec(num_train=6, num_val=1, class_colours=False))
    assert coloured.max() < 25.0  # +-15 degrees of jitter, plus shading and sensor noise
    assert np.median(random) > 30.0
