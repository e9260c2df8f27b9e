"""experiments/devset/build.py on tiny fake snapshots written here (no download): layout, merging, provenance,
checksum, no overwrite, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from faster_coco_eval.core import mask as mask_api
from PIL import Image

from experiments.devset import build

LICENSES = [
    {"id": 1, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"},
    {"id": 2, "name": "No known copyright restrictions", "url": "http://flickr.com/commons/usage/"},
]
CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "a"}]


def _image(i: int) -> dict:
    return {
        "id": i,
        "file_name": f"{i:012d}.png",
        "height": 12,
        "width": 16,
        "license": 1 + i % 2,
        "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
    }


def _rle(h: int, w: int) -> dict:
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[2:6, 3:9] = 1
    rle = mask_api.encode(m)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write_snapshot(root: Path, ids: list[int], split: str = "train2017", extra: dict | None = None) -> Path:
    """A COCO 2017-layout folder: per image a polygon, a compressed RLE and (on image 3) a crowd region."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in ids:
        im = _image(i)
        images.append(im)
        (root / split).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / im["file_name"])
        anns.append(
            {
                "id": 100 * i + 1,
                "image_id": i,
                "category_id": 1,
                "iscrowd": 0,
                "area": 20.0,
                "bbox": [1, 1, 4, 5],
                "segmentation": [[1, 1, 5, 1, 5, 6, 1, 6]],
            }
        )
        anns.append(
            {
                "id": 100 * i + 2,
                "image_id": i,
                "category_id": 18,
                "iscrowd": 0,
                "area": 24.0,
                "bbox": [3, 2, 6, 4],
                "segmentation": _rle(im["height"], im["width"]),
            }
        )
        if i == 3:
            anns.append(
                {
                    "id": 100 * i + 3,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 1,
                    "area": 24.0,
                    "bbox": [3, 2, 6, 4],
                    "segmentation": _rle(im["height"], im["width"]),
                }
            )
    doc = {"images": images, "annotations": anns, "categories": CATEGORIES, "licenses": LICENSES}
    doc.update(extra or {})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def _run(*args: str) -> int:
    return build.main(list(args))


def test_builds_coco_layout_with_provenance_and_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    snap = _write_snapshot(tmp_path / "snap", list(range(1, 21)))
    cache = tmp_path / "cache"
    assert _run("--snapshot", str(snap), "--cache-dir", str(cache), "--name", "t", "--repository", "me/snap") == 0
    out = cache / "devset" / "t"
    prov = json.loads((out / "PROVENANCE.json").read_text())
    seen = {}
    for split in ("train", "val"):
        doc = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        ids = {im["id"] for im in doc["images"]}
        seen[split] = ids
        assert all(build.split_of(i, 35) == split for i in ids)
        assert {a["image_id"] for a in doc["annotations"]} == ids  # every annotation goes with its image
        for im in doc["images"]:
            assert (out / split / im["file_name"]).is_file()
        assert doc["categories"] == CATEGORIES
    assert seen["train"] | seen["val"] == set(range(1, 21)) and not seen["train"] & seen["val"]
    assert seen["train"] and seen["val"]
    # the checksum is the sha256 of the sorted '<path>  <sha256>' lines of the data files on disk
    lines = sorted(
        f"{p.relative_to(out).as_posix()}  {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
        for p in out.rglob("*")
        if p.is_file() and p.name != "PROVENANCE.json"
    )
    assert prov["checksum"]["sha256"] == hashlib.sha256("".join(lines).encode()).hexdigest()
    by_id = {e["id"]: e for e in prov["images"]}
    assert by_id[4]["license"]["name"] == "Attribution License" and by_id[3]["license"]["id"] == 2
    assert by_id[4]["source"] == {"repository": "me/snap", "commit": None, "path": "train2017/000000000004.png"}
    assert by_id[4]["coco2017_split"] == "train2017"
    # the crowd region is kept for the evaluator but is not counted as an instance
    assert prov["counts"]["train"]["instances"] + prov["counts"]["val"]["instances"] == 40
    # the committed copy is the same provenance, without photos
    assert json.loads((tmp_path / "committed" / "t.provenance.json").read_text()) == prov


def test_same_set_again_is_unchanged_and_a_different_one_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    cache = tmp_path / "cache"
    snap = _write_snapshot(tmp_path / "a", [1, 2, 3])
    assert _run("--snapshot", str(snap), "--cache-dir", str(cache), "--name", "t") == 0
    assert capsys.readouterr().out.startswith("written:")
    before = (cache / "devset" / "t" / "PROVENANCE.json").read_bytes()
    assert _run("--snapshot", str(snap), "--cache-dir", str(cache), "--name", "t") == 0
    assert capsys.readouterr().out.startswith("unchanged:")
    other = _write_snapshot(tmp_path / "b", [1, 2, 3, 4])
    assert _run("--snapshot", str(other), "--cache-dir", str(cache), "--name", "t") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different set" in err
    assert (cache / "devset" / "t" / "PROVENANCE.json").read_bytes() == before  # nothing overwritten


def test_duplicate_images_across_jsons_are_taken_once_and_bare_git_snapshots_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    work = _write_snapshot(tmp_path / "work", [5, 6, 7])
    _write_snapshot(work, [5, 6, 7], split="val2017")  # the same photos listed as val too, as COCO128 does
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "x"], check=True)
    bare = tmp_path / "mirror" / "owner+name" / "repo"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    commit = subprocess.run(["git", "--git-dir", str(bare), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert _run("--snapshot", str(bare), "--cache-dir", str(tmp_path / "c"), "--name", "t") == 0
    prov = json.loads((tmp_path / "c" / "devset" / "t" / "PROVENANCE.json").read_text())
    assert sorted(e["id"] for e in prov["images"]) == [5, 6, 7]
    assert {e["source"]["repository"] for e in prov["images"]} == {"owner/name"}
    assert {e["source"]["commit"] for e in prov["images"]} == {commit.stdout.strip()}


def test_yolo_style_images_folder_is_found_by_the_json_split(tmp_path, monkeypatch):
    """<root>/images/<split>/ (ndttoan/retinanet_pytorch's layout) holds the photos; a same-named file in
    images/val2017 (other pixels) must not make the train2017 JSON's image ambiguous."""
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    snap = _write_snapshot(tmp_path / "snap", [1, 2])
    (snap / "images").mkdir()
    shutil.move(snap / "train2017", snap / "images" / "train2017")
    (snap / "images" / "val2017").mkdir()
    for name in ("000000000001.png", "000000000002.png"):
        Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(snap / "images" / "val2017" / name)
    assert _run("--snapshot", str(snap), "--cache-dir", str(tmp_path / "c"), "--name", "t") == 0
    out = tmp_path / "c" / "devset" / "t"
    prov = json.loads((out / "PROVENANCE.json").read_text())
    for entry in prov["images"]:
        assert entry["source"]["path"] == f"images/train2017/{entry['file_name']}"
        written = (out / entry["split"] / entry["file_name"]).read_bytes()
        assert written == (snap / "images" / "train2017" / entry["file_name"]).read_bytes()


def test_rebuild_from_coco2017_gives_the_same_checksum(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    snap = _write_snapshot(tmp_path / "snap", [1, 2, 3, 4])
    assert _run("--snapshot", str(snap), "--cache-dir", str(tmp_path / "c1"), "--name", "t") == 0
    committed = json.loads((tmp_path / "committed" / "t.provenance.json").read_text())
    # a "COCO 2017" folder: the same images and annotations, plus an image the set does not list
    coco = _write_snapshot(tmp_path / "coco", [1, 2, 3, 4, 9])
    assert _run("--from-coco2017", str(coco), "--cache-dir", str(tmp_path / "c2"), "--name", "t") == 0
    rebuilt = json.loads((tmp_path / "c2" / "devset" / "t" / "PROVENANCE.json").read_text())
    assert rebuilt["checksum"] == committed["checksum"]
    assert [e["id"] for e in rebuilt["images"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 1]]), "annotation 101 has a polygon with fewer"),
        (lambda d: d["annotations"][1]["segmentation"].update(size=[5, 5]), "annotation 102: RLE size [5, 5]"),
        (lambda d: d["annotations"][0].update(image_id=77), "annotation 101 names image 77"),
        (lambda d: d["annotations"][0].update(category_id=5), "annotation 101 names unknown category 5"),
        (lambda d: d["images"][0].update(file_name="missing.png"), "image 'missing.png' is not in the snapshot"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_id_and_writes_nothing(tmp_path, monkeypatch, capsys, corrupt, message):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    snap = _write_snapshot(tmp_path / "snap", [1, 2])
    path = snap / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    corrupt(doc)
    path.write_text(json.dumps(doc))
    assert _run("--snapshot", str(snap), "--cache-dir", str(tmp_path / "c"), "--name", "t") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "annotations/instances_train2017.json" in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "committed").exists()


def test_lfs_pointers_and_non_coco_folders_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    snap = _write_snapshot(tmp_path / "snap", [1])
    (snap / "train2017" / "000000000001.png").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid x\n")
    assert _run("--snapshot", str(snap), "--cache-dir", str(tmp_path / "c")) == 2
    assert "Git LFS pointer" in capsys.readouterr().err
    shutil.rmtree(snap / "annotations")
    assert _run("--snapshot", str(snap), "--cache-dir", str(tmp_path / "c")) == 2
    assert "no instances_*.json" in capsys.readouterr().err


def _write_voc(root: Path, class_value: int = 15) -> Path:
    """A VOC2012 folder with one 12x16 photo: a person (instance 1, class `class_value`) in rows 2-5, columns 3-8,
    ringed by VOC's 255 void border, and a dog (instance 2, class 12) in rows 8-10, columns 1-4."""
    voc_root = root / "VOCdevkit" / "VOC2012"
    obj = np.zeros((12, 16), dtype=np.uint8)
    obj[1:7, 2:10] = 255
    obj[2:6, 3:9] = 1
    obj[8:11, 1:5] = 2
    cls = np.where(obj == 1, class_value, np.where(obj == 2, 12, obj)).astype(np.uint8)
    for folder, arr in (("SegmentationObject", obj), ("SegmentationClass", cls)):
        (voc_root / folder).mkdir(parents=True)
        img = Image.fromarray(arr, mode="P")
        img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
        img.save(voc_root / folder / "2008_000123.png")
    (voc_root / "JPEGImages").mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(voc_root / "JPEGImages" / "2008_000123.jpg")
    return root


def test_voc_snapshot_becomes_coco_instances_under_coco_category_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    coco = _write_snapshot(tmp_path / "coco", [1, 2, 3])
    voc_snap = _write_voc(tmp_path / "voc")
    cache = tmp_path / "c"
    assert _run("--snapshot", str(coco), "--voc-snapshot", str(voc_snap), "--cache-dir", str(cache), "--name", "t") == 0
    out = cache / "devset" / "t"
    prov = json.loads((out / "PROVENANCE.json").read_text())
    entry = next(e for e in prov["images"] if e["id"] == 2008000123)
    assert entry["source"]["path"] == "VOCdevkit/VOC2012/JPEGImages/2008_000123.jpg" and entry["license"] is None
    doc = json.loads((out / "annotations" / f"instances_{entry['split']}.json").read_text())
    # COCO's categories: the COCO snapshot's person (1) and dog (18), and all 20 VOC classes under COCO's names
    names = {c["id"]: c["name"] for c in doc["categories"]}
    assert names[1] == "person" and names[18] == "dog" and names[5] == "airplane" and names[72] == "tv"
    assert len(names) == 20
    anns = sorted((a for a in doc["annotations"] if a["image_id"] == 2008000123), key=lambda a: a["id"])
    assert [a["category_id"] for a in anns] == [1, 18]
    person = np.zeros((12, 16), dtype=np.uint8)
    person[2:6, 3:9] = 1  # the void ring belongs to no instance
    dog = np.zeros((12, 16), dtype=np.uint8)
    dog[8:11, 1:5] = 1
    for ann, want, bbox in ((anns[0], person, [3, 2, 6, 4]), (anns[1], dog, [1, 8, 4, 3])):
        got = mask_api.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
        assert np.array_equal(got, want)
        assert ann["area"] == float(want.sum()) and ann["bbox"] == bbox and ann["iscrowd"] == 0
    photo = out / entry["split"] / "2008_000123.jpg"
    assert photo.read_bytes() == (voc_snap / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2008_000123.jpg").read_bytes()


def test_voc_class_values_beyond_the_20_classes_are_refused_naming_the_snapshot_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "HERE", tmp_path / "committed")
    voc_snap = _write_voc(tmp_path / "voc", class_value=30)
    assert _run("--voc-snapshot", str(voc_snap), "--cache-dir", str(tmp_path / "c"), "--name", "t") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class value 30" in err
    assert "VOCdevkit/VOC2012/SegmentationClass/2008_000123.png" in err and "ranprm-voc-" not in err
    assert not (tmp_path / "c" / "devset" / "t").exists()
