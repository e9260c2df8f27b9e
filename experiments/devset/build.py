"""Build the real-photo development set: COCO-format photos with instance masks, from public snapshots, into the cache.

    python -m experiments.devset.build --snapshot DIR [--snapshot DIR ...] [--voc-snapshot DIR ...] [--name NAME]
    python -m experiments.devset.build --from-coco2017 /path/to/coco [--name NAME]

A snapshot is a bare git directory (what the search tool's `fetch` brings: /work/.mirror/<owner>+<name>/repo) or a
plain folder. Every `instances_*.json` in it (COCO format: images, annotations with polygons or RLE, categories) is
read, each image is found by its `file_name` next to the JSON (`<root>/<split>/<file_name>` as in COCO 2017, or any
folder of the snapshot holding that file name), and the images of all snapshots are merged by image id (an image
two JSONs both list, as when a snapshot ships the same images as train and val, is taken once). A `--voc-snapshot`
holds Pascal VOC folders (JPEGImages/, SegmentationObject/, SegmentationClass/): each segmented image joins the set
with its instances as RLE under COCO's category ids of the 20 VOC classes, image id 2008_000123 -> 2008000123. The
set is written in COCO 2017 layout, ready for `data=coco`:

    $RANPRM_CACHE/devset/<name>/annotations/instances_{train,val}.json
    $RANPRM_CACHE/devset/<name>/{train,val}/<file_name>
    $RANPRM_CACHE/devset/<name>/PROVENANCE.json     repositories, commits, image ids, licences, source paths, checksum

Which split an image goes to is a function of its id alone (sha256 of the id, `--val-percent` of the 100 buckets to
val), so the same photos always land in the same split, whatever else a snapshot holds. The checksum is sha256 over
the sorted (path, sha256 of the file) lines of every data file, PROVENANCE.json excluded. A copy of the provenance
(no photos) is kept in git as experiments/devset/<name>.provenance.json; `--from-coco2017` rebuilds the same set from
a COCO 2017 folder (annotations/instances_{train,val}2017.json, train2017/, val2017/) by the ids listed there.

Nothing is overwritten: a folder that holds the same set (same checksum) is left as it is; a different one is an
error. The set is assembled in a staging folder next to its final place and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_api

from ranprm.data import voc
from ranprm.data.coco import VOC_TO_COCO_NAMES
from ranprm.data.synthetic import default_cache_dir
from ranprm.errors import DataError, RanprmError
from ranprm.utils.io import temp_path_for, write_bytes_atomic

HERE = Path(__file__).resolve().parent
DEFAULT_NAME = "coco-snapshots-v2"
DEFAULT_VAL_PERCENT = 35
SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LFS_POINTER = b"version https://git-lfs"
COCO_IMAGE_HOST = "images.cocodataset.org/"


# --------------------------------------------------------------------------------------------------- snapshots


@dataclass
class Snapshot:
    """A bare git directory (read at HEAD) or a plain folder, with the repository and commit it came from."""

    path: Path
    repository: str
    commit: str | None
    is_git: bool
    _files: list[str] = field(default_factory=list)

    def files(self) -> list[str]:
        if not self._files:
            if self.is_git:
                out = _git(self.path, "ls-tree", "-r", "-z", "--name-only", "HEAD")
                self._files = sorted(p for p in out.decode().split("\0") if p)
            else:
                self._files = sorted(
                    p.relative_to(self.path).as_posix()
                    for p in self.path.rglob("*")
                    if p.is_file() and ".git" not in p.relative_to(self.path).parts
                )
        return self._files

    def read(self, rel: str) -> bytes:
        data = _git(self.path, "show", f"HEAD:{rel}") if self.is_git else (self.path / rel).read_bytes()
        if data.startswith(LFS_POINTER):
            raise DataError(f"{self.path}: {rel} is a Git LFS pointer, not the file; fetch its LFS objects first")
        return data


def _git(git_dir: Path, *args: str) -> bytes:
    done = subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, check=False)
    if done.returncode != 0:
        raise DataError(f"{git_dir}: git {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _repository_from_path(path: Path) -> str:
    """`owner/name` from a mirror path (/work/.mirror/<owner>+<name>/repo), else the folder's name."""
    for part in reversed(path.resolve().parts):
        if "+" in part:
            owner, _, name = part.partition("+")
            return f"{owner}/{name}"
    return path.resolve().name


def open_snapshot(path: str | Path, repository: str | None = None) -> Snapshot:
    """A bare git directory (objects/ and HEAD, or a .git inside) or a folder; a work tree's commit is recorded."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--snapshot {root}: no such folder")
    git_dir = root / ".git" if (root / ".git").is_dir() else root
    repo = repository or _repository_from_path(root)
    if (git_dir / "objects").is_dir() and (git_dir / "HEAD").is_file():
        commit = _git(git_dir, "rev-parse", "HEAD").decode().strip()
        if git_dir == root:  # bare: read from the object store
            return Snapshot(root, repo, commit, is_git=True)
        return Snapshot(root, repo, commit, is_git=False)
    return Snapshot(root, repo, None, is_git=False)


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class SourceImage:
    """One photo of the set: its COCO image record, its annotations, its licence and where its bytes came from."""

    record: dict[str, Any]
    annotations: list[dict[str, Any]]
    license: dict[str, Any] | None
    repository: str
    commit: str | None
    json_path: str
    image_path: str
    data: bytes


def _load_json(snapshot: Snapshot, rel: str) -> dict[str, Any]:
    try:
        data = json.loads(snapshot.read(rel))
    except ValueError as err:
        raise DataError(f"{snapshot.repository}:{rel}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise DataError(f"{snapshot.repository}:{rel}: not a COCO instances file (needs 'images' and 'annotations')")
    if not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DataError(f"{snapshot.repository}:{rel}: has no 'categories'")
    return data


def _instance_jsons(snapshot: Snapshot) -> list[str]:
    found = [p for p in snapshot.files() if Path(p).name.startswith("instances_") and p.endswith(".json")]
    if not found:
        raise DataError(f"--snapshot {snapshot.path}: no instances_*.json in it; is it a COCO-format snapshot?")
    return found


def _find_image(snapshot: Snapshot, json_rel: str, file_name: str, by_name: dict[str, list[str]]) -> str:
    """The snapshot path of `file_name`: COCO 2017 layout first (<root>/<split>/<file_name>, or <root>/images/<split>/
    as YOLO-style copies lay it out), then next to the JSON, else a unique match."""
    json_path = Path(json_rel)
    split = json_path.stem.removeprefix("instances_")
    root = json_path.parent.parent
    candidates = (root / split / file_name, root / "images" / split / file_name, json_path.parent / file_name)
    for candidate in (c.as_posix() for c in candidates):
        if candidate in by_name.get(Path(file_name).name, ()):
            return candidate
    matches = [p for p in by_name.get(Path(file_name).name, ()) if p.endswith("/" + file_name) or p == file_name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise DataError(f"{snapshot.repository}:{json_rel}: image {file_name!r} is not in the snapshot")
    raise DataError(f"{snapshot.repository}:{json_rel}: image {file_name!r} is in several folders: {matches[:3]}")


def _check_annotation(ann: dict[str, Any], image: dict[str, Any], where: str) -> None:
    """Decode the annotation's mask with faster-coco-eval's mask API: bad polygons and RLE sizes fail here."""
    seg = ann.get("segmentation")
    h, w = int(image["height"]), int(image["width"])
    if isinstance(seg, list):
        if not seg or any(not isinstance(p, list) or len(p) < 6 for p in seg):
            raise DataError(f"{where}: annotation {ann.get('id')} has a polygon with fewer than 3 points")
    elif isinstance(seg, dict):
        if list(seg.get("size", [])) != [h, w]:
            raise DataError(
                f"{where}: annotation {ann.get('id')}: RLE size {seg.get('size')} is not the image's {h}x{w}"
            )
    else:
        raise DataError(f"{where}: annotation {ann.get('id')} has no polygon or RLE segmentation")
    rle = mask_api.segmToRle(seg, w, h)
    if float(mask_api.area(rle)) <= 0:
        raise DataError(f"{where}: annotation {ann.get('id')} has an empty mask")


def read_snapshot(snapshot: Snapshot) -> tuple[list[SourceImage], list[dict[str, Any]]]:
    """Every annotated image of every instances_*.json in `snapshot`, and the categories those files name."""
    files = snapshot.files()
    by_name: dict[str, list[str]] = {}
    for p in files:
        if p.lower().endswith(IMAGE_SUFFIXES):
            by_name.setdefault(Path(p).name, []).append(p)
    images: list[SourceImage] = []
    categories: list[dict[str, Any]] = []
    for json_rel in _instance_jsons(snapshot):
        data = _load_json(snapshot, json_rel)
        where = f"{snapshot.repository}:{json_rel}"
        licenses = {lic.get("id"): lic for lic in data.get("licenses") or [] if isinstance(lic, dict)}
        cat_ids = {c["id"] for c in data["categories"]}
        categories.extend(data["categories"])
        anns_by_image: dict[int, list[dict[str, Any]]] = {}
        image_ids = {im["id"] for im in data["images"]}
        for ann in data["annotations"]:
            if ann.get("image_id") not in image_ids:
                raise DataError(
                    f"{where}: annotation {ann.get('id')} names image {ann.get('image_id')}, not in 'images'"
                )
            if ann.get("category_id") not in cat_ids:
                raise DataError(f"{where}: annotation {ann.get('id')} names unknown category {ann.get('category_id')}")
            anns_by_image.setdefault(ann["image_id"], []).append(ann)
        for im in data["images"]:
            anns = anns_by_image.get(im["id"], [])
            if not anns:
                continue  # an image without instances teaches PRM nothing and cannot be scored
            for ann in anns:
                _check_annotation(ann, im, where)
            image_path = _find_image(snapshot, json_rel, im["file_name"], by_name)
            images.append(
                SourceImage(
                    record=im,
                    annotations=sorted(anns, key=lambda a: a["id"]),
                    license=licenses.get(im.get("license")),
                    repository=snapshot.repository,
                    commit=snapshot.commit,
                    json_path=json_rel,
                    image_path=image_path,
                    data=snapshot.read(image_path),
                )
            )
    return images, categories


# --------------------------------------------------------------------------------------------------- Pascal VOC

# COCO 2017's category id and supercategory of each VOC class: VOC photos join the set under COCO's ids and names
# (ranprm.data.coco.VOC_TO_COCO_NAMES spells the six that differ), so they merge with the COCO snapshots' categories
# and `data.classes=voc` maps them back to VOC's names.
COCO_CATEGORY_OF_VOC: dict[str, tuple[int, str]] = {
    "aeroplane": (5, "vehicle"), "bicycle": (2, "vehicle"), "bird": (16, "animal"), "boat": (9, "vehicle"),
    "bottle": (44, "kitchen"), "bus": (6, "vehicle"), "car": (3, "vehicle"), "cat": (17, "animal"),
    "chair": (62, "furniture"), "cow": (21, "animal"), "diningtable": (67, "furniture"), "dog": (18, "animal"),
    "horse": (19, "animal"), "motorbike": (4, "vehicle"), "person": (1, "person"), "pottedplant": (64, "furniture"),
    "sheep": (20, "animal"), "sofa": (63, "furniture"), "train": (7, "vehicle"), "tvmonitor": (72, "electronic"),
}  # fmt: skip


def voc_categories() -> list[dict[str, Any]]:
    return [
        {"id": cid, "name": VOC_TO_COCO_NAMES.get(name, name), "supercategory": sup}
        for name, (cid, sup) in COCO_CATEGORY_OF_VOC.items()
    ]


def voc_image_id(voc_id: str) -> int:
    """VOC's `2008_000123` as the integer 2008000123: unique, and above every COCO 2017 image id (< 600000)."""
    digits = voc_id.replace("_", "")
    if not digits.isdigit():
        raise DataError(f"VOC image {voc_id!r}: expected a VOC id such as 2008_000123")
    return int(digits)


def _voc_annotations(targets: voc.InstanceTargets, image_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per VOC instance: its SegmentationObject region (void excluded) as compressed RLE."""
    anns = []
    for k, (mask, label) in enumerate(zip(targets.masks.numpy(), targets.labels.tolist(), strict=True), start=1):
        rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        cid, _ = COCO_CATEGORY_OF_VOC[voc.VOC_CLASSES[label]]
        anns.append(
            {
                "id": image_id * 100 + k,
                "image_id": image_id,
                "category_id": cid,
                "iscrowd": 0,
                "area": float(mask_api.area(rle)),
                "bbox": [float(v) for v in mask_api.toBbox(rle)],
                "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
            }
        )
    return anns


def read_voc_snapshot(snapshot: Snapshot) -> tuple[list[SourceImage], list[dict[str, Any]]]:
    """Every image of a Pascal VOC snapshot with a SegmentationObject PNG, as COCO-format instances.

    A VOC year folder (JPEGImages/, SegmentationObject/, SegmentationClass/) may sit anywhere in the snapshot. Each
    instance is its SegmentationObject region with the class SegmentationClass gives it (ranprm.data.voc's reader);
    VOC's 255 border/void pixels belong to no instance, and COCO format has no void: they are scored as background.
    """
    files = snapshot.files()
    present = set(files)
    objects = [p for p in files if p.endswith(".png") and Path(p).parent.name == "SegmentationObject"]
    if not objects:
        raise DataError(
            f"--voc-snapshot {snapshot.path}: no SegmentationObject/*.png in it; is it a Pascal VOC folder?"
        )
    images: list[SourceImage] = []
    with tempfile.TemporaryDirectory(prefix="ranprm-voc-") as tmp:
        for obj_rel in objects:
            root_rel, voc_id = Path(obj_rel).parent.parent, Path(obj_rel).stem
            jpg_rel = (root_rel / "JPEGImages" / f"{voc_id}.jpg").as_posix()
            cls_rel = (root_rel / "SegmentationClass" / f"{voc_id}.png").as_posix()
            for needed in (jpg_rel, cls_rel):
                if needed not in present:
                    raise DataError(f"{snapshot.repository}:{obj_rel} has no {needed}; VOC instances need both")
            # ranprm.data.voc reads masks from a VOC folder: lay this image's three files out as one
            local = Path(tmp) / voc_id
            data = snapshot.read(jpg_rel)
            write_bytes_atomic(local / "JPEGImages" / f"{voc_id}.jpg", data)
            obj_path, cls_path = voc.mask_paths(local, voc_id)
            write_bytes_atomic(obj_path, snapshot.read(obj_rel))
            write_bytes_atomic(cls_path, snapshot.read(cls_rel))
            try:
                voc.check_class_values(cls_path, len(voc.VOC_CLASSES))
                height, width = voc.image_size_of(local / "JPEGImages" / f"{voc_id}.jpg")
                targets = voc.read_instance_masks(local, voc_id, (height, width))
            except DataError as err:  # name the snapshot's file, not the scratch copy
                raise DataError(f"{snapshot.repository}: {str(err).replace(str(local), root_rel.as_posix())}") from None
            shutil.rmtree(local)
            if targets is None or not len(targets.labels):
                continue  # an image without instances teaches PRM nothing and cannot be scored
            image_id = voc_image_id(voc_id)
            record = {"id": image_id, "file_name": f"{voc_id}.jpg", "height": height, "width": width}
            images.append(
                SourceImage(
                    record,
                    _voc_annotations(targets, image_id),
                    None,
                    snapshot.repository,
                    snapshot.commit,
                    obj_rel,
                    jpg_rel,
                    data,
                )  # fmt: skip
            )
    return images, voc_categories()


# --------------------------------------------------------------------------------------------------- merging


def merge_categories(categories: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per id; two files that give one id two names cannot be merged."""
    merged: dict[int, dict[str, Any]] = {}
    for cat in categories:
        known = merged.setdefault(cat["id"], {k: cat[k] for k in ("id", "name", "supercategory") if k in cat})
        if known["name"] != cat["name"]:
            raise DataError(
                f"category id {cat['id']} is {known['name']!r} in one source and {cat['name']!r} in another"
            )
    return [merged[k] for k in sorted(merged)]


def merge_images(images: Iterable[SourceImage]) -> list[SourceImage]:
    """One photo per image id (the first source that lists it); the same id with other pixels is an error."""
    chosen: dict[int, SourceImage] = {}
    for img in images:
        first = chosen.setdefault(img.record["id"], img)
        if first is not img and hashlib.sha256(first.data).digest() != hashlib.sha256(img.data).digest():
            raise DataError(
                f"image id {img.record['id']}: {first.repository}:{first.image_path} and "
                f"{img.repository}:{img.image_path} are different photos"
            )
    ann_ids: dict[int, int] = {}
    for img in chosen.values():
        for ann in img.annotations:
            if ann_ids.setdefault(ann["id"], img.record["id"]) != img.record["id"]:
                raise DataError(
                    f"annotation id {ann['id']} is used by images {ann_ids[ann['id']]} and {img.record['id']}"
                )
    return [chosen[k] for k in sorted(chosen)]


def split_of(image_id: int, val_percent: int) -> str:
    """`val` for `val_percent` of the 100 sha256 buckets of the id: stable whatever else the set holds."""
    bucket = int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "big") % 100
    return "val" if bucket < val_percent else "train"


def coco2017_split(record: dict[str, Any]) -> str | None:
    """`train2017` / `val2017` where the image is a COCO 2017 photo (its coco_url says so), else None."""
    url = str(record.get("coco_url") or "")
    if COCO_IMAGE_HOST not in url:
        return None
    return url.split(COCO_IMAGE_HOST, 1)[1].split("/", 1)[0]


# --------------------------------------------------------------------------------------------------- writing


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checksum(files: dict[str, bytes]) -> str:
    """sha256 over the sorted `<path>  <sha256 of the file>` lines: one number for the whole set."""
    lines = "".join(f"{path}  {_sha256(data)}\n" for path, data in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def set_files(images: Sequence[SourceImage], categories: list[dict[str, Any]], val_percent: int) -> dict[str, bytes]:
    """Every data file of the set, by its path inside the set folder."""
    licenses = {}
    for img in images:
        if img.license is not None:
            licenses[img.license["id"]] = img.license
    files: dict[str, bytes] = {}
    for split in SPLITS:
        members = [img for img in images if split_of(img.record["id"], val_percent) == split]
        for img in members:
            files[f"{split}/{img.record['file_name']}"] = img.data
        doc = {
            "info": {"description": f"ranprm development set, split {split} (experiments/devset/build.py)"},
            "licenses": [licenses[k] for k in sorted(licenses)],
            "images": [img.record for img in members],
            "annotations": [ann for img in members for ann in img.annotations],
            "categories": categories,
        }
        files[f"annotations/instances_{split}.json"] = (json.dumps(doc, sort_keys=True) + "\n").encode()
    return files


def provenance(
    name: str, images: Sequence[SourceImage], val_percent: int, digest: str, sources: list[dict[str, Any]]
) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {s: {"images": 0, "instances": 0} for s in SPLITS}
    entries = []
    for img in images:
        split = split_of(img.record["id"], val_percent)
        counts[split]["images"] += 1
        counts[split]["instances"] += sum(1 for a in img.annotations if not a.get("iscrowd"))
        lic = img.license or {}
        entries.append(
            {
                "id": img.record["id"],
                "split": split,
                "file_name": img.record["file_name"],
                "coco2017_split": coco2017_split(img.record),
                "license": {k: lic.get(k) for k in ("id", "name", "url")} if lic else None,
                "flickr_url": img.record.get("flickr_url"),
                "source": {"repository": img.repository, "commit": img.commit, "path": img.image_path},
                "annotations_from": img.json_path,
            }
        )
    return {
        "name": name,
        "builder": "experiments/devset/build.py",
        "layout": "COCO 2017: annotations/instances_{train,val}.json, {train,val}/<file_name>",
        "split_rule": f"val when sha256(str(image id)) mod 100 < {val_percent}",
        "val_percent": val_percent,
        "sources": sources,
        "counts": counts,
        "checksum": {"algorithm": "sha256 over sorted '<path>  <sha256>' lines of the data files", "sha256": digest},
        "images": entries,
    }


def write_set(out: Path, files: dict[str, bytes], prov: dict[str, Any]) -> str:
    """Write the set into `out` via a staging folder; returns 'written' or 'unchanged'."""
    existing = out / "PROVENANCE.json"
    if out.exists():
        try:
            old = json.loads(existing.read_text())["checksum"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            raise DataError(f"{out} exists and is not a development set built here; choose another --name") from None
        if old != prov["checksum"]["sha256"]:
            raise DataError(f"{out} holds a different set (checksum {old[:12]}...); choose another --name or remove it")
        return "unchanged"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_path_for(out)
    try:
        for rel, data in files.items():
            write_bytes_atomic(staging / rel, data)
        write_bytes_atomic(staging / "PROVENANCE.json", (json.dumps(prov, indent=1, sort_keys=True) + "\n").encode())
        os.rename(staging, out)  # a folder that exists under the final name is a whole set
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return "written"


def build(
    images: list[SourceImage],
    categories: list[dict[str, Any]],
    sources: list[dict[str, Any]],
    name: str,
    val_percent: int,
    cache_dir: Path,
) -> tuple[Path, dict[str, Any], str]:
    if not images:
        raise DataError("the snapshots hold no annotated image")
    merged = merge_images(images)
    cats = merge_categories(categories)
    files = set_files(merged, cats, val_percent)
    prov = provenance(name, merged, val_percent, checksum(files), sources)
    out = cache_dir / "devset" / name
    return out, prov, write_set(out, files, prov)


# --------------------------------------------------------------------------------------------------- COCO 2017


def read_coco2017(root: Path, recorded: dict[str, Any]) -> tuple[list[SourceImage], list[dict[str, Any]]]:
    """The images a committed provenance lists, from a COCO 2017 folder, with COCO's own annotations."""
    wanted: dict[str, set[int]] = {}
    for entry in recorded["images"]:
        if entry.get("coco2017_split") is None:
            raise DataError(f"image {entry['id']} of set {recorded['name']!r} is not a COCO 2017 photo")
        wanted.setdefault(entry["coco2017_split"], set()).add(entry["id"])
    snapshot = Snapshot(root, "COCO 2017 (cocodataset.org)", None, is_git=False)
    images: list[SourceImage] = []
    categories: list[dict[str, Any]] = []
    for split, ids in sorted(wanted.items()):
        rel = f"annotations/instances_{split}.json"
        if not (root / rel).is_file():
            raise DataError(f"--from-coco2017 {root}: {rel} is missing")
        data = _load_json(snapshot, rel)
        licenses = {lic["id"]: lic for lic in data.get("licenses") or []}
        categories.extend(data["categories"])
        anns: dict[int, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if ann["image_id"] in ids:
                anns.setdefault(ann["image_id"], []).append(ann)
        for im in data["images"]:
            if im["id"] not in ids:
                continue
            path = f"{split}/{im['file_name']}"
            if not (root / path).is_file():
                raise DataError(f"--from-coco2017 {root}: {path} is missing")
            images.append(
                SourceImage(
                    im,
                    sorted(anns.get(im["id"], []), key=lambda a: a["id"]),
                    licenses.get(im.get("license")),
                    snapshot.repository,
                    None,
                    rel,
                    path,
                    (root / path).read_bytes(),
                )
            )
    return images, categories


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshot", action="append", help="a bare git dir or folder with COCO-format data (repeat)")
    parser.add_argument(
        "--voc-snapshot",
        action="append",
        help="a bare git dir or folder with Pascal VOC JPEGImages + SegmentationObject + SegmentationClass (repeat)",
    )
    parser.add_argument("--from-coco2017", help="a COCO 2017 folder: rebuild the committed set by its image ids")
    parser.add_argument(
        "--name", default=DEFAULT_NAME, help=f"the set's folder under <cache>/devset (default {DEFAULT_NAME})"
    )
    parser.add_argument(
        "--repository", action="append", help="owner/name of each --snapshot, where its path does not say"
    )
    parser.add_argument("--val-percent", type=int, default=DEFAULT_VAL_PERCENT, help="share of ids in val (0-100)")
    parser.add_argument("--cache-dir", help="default: $RANPRM_CACHE, else ~/.cache/ranprm")
    parser.add_argument(
        "--no-commit-copy", action="store_true", help="do not write experiments/devset/<name>.provenance.json"
    )
    args = parser.parse_args(argv)
    try:
        if args.from_coco2017 and (args.snapshot or args.voc_snapshot):
            raise DataError(
                "--from-coco2017 rebuilds a committed set by itself: give it without --snapshot/--voc-snapshot"
            )
        if not (args.from_coco2017 or args.snapshot or args.voc_snapshot):
            raise DataError("give --snapshot and/or --voc-snapshot folders, or --from-coco2017")
        if not 0 < args.val_percent < 100:
            raise DataError(f"--val-percent {args.val_percent}: give a number between 1 and 99")
        cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
        committed = HERE / f"{args.name}.provenance.json"
        if args.from_coco2017:
            if not committed.is_file():
                raise DataError(f"--from-coco2017: no committed provenance {committed} for set {args.name!r}")
            recorded = json.loads(committed.read_text())
            images, categories = read_coco2017(Path(args.from_coco2017).expanduser(), recorded)
            sources = [
                {"repository": "COCO 2017 (cocodataset.org)", "commit": None, "rebuilt_from": recorded["sources"]}
            ]
            val_percent = int(recorded["val_percent"])
        else:
            repos = args.repository or []
            if repos and len(repos) != len(args.snapshot or []):
                raise DataError("--repository: give one per --snapshot, in the same order")
            images, categories, sources = [], [], []
            for i, path in enumerate(args.snapshot or []):
                snap = open_snapshot(path, repos[i] if repos else None)
                got, cats = read_snapshot(snap)
                images += got
                categories += cats
                sources.append({"repository": snap.repository, "commit": snap.commit, "files": _instance_jsons(snap)})
            for path in args.voc_snapshot or []:
                snap = open_snapshot(path)
                got, cats = read_voc_snapshot(snap)
                images += got
                categories += cats
                sources.append({"repository": snap.repository, "commit": snap.commit, "format": "Pascal VOC",
                                "voc_images": len(got)})  # fmt: skip
            val_percent = args.val_percent
        out, prov, what = build(images, categories, sources, args.name, val_percent, cache_dir)
        if args.from_coco2017 and prov["checksum"]["sha256"] != recorded["checksum"]["sha256"]:
            print(f"note: the rebuilt set's checksum differs from the committed one ({out})", file=sys.stderr)
        if not args.from_coco2017 and not args.no_commit_copy:
            write_bytes_atomic(committed, (json.dumps(prov, indent=1, sort_keys=True) + "\n").encode())
    except (RanprmError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = prov["counts"]
    print(
        f"{what}: {out} ({c['train']['images']} train / {c['val']['images']} val images, "
        f"{c['train']['instances']} / {c['val']['instances']} instances, sha256 {prov['checksum']['sha256'][:16]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
