"""COCO-style results files: `ranprm-predict` writes them, `ranprm-evaluate predictions=FILE` reads them.

A results file is a JSON list with one entry per predicted instance:

    {"image_id": "2007_000033",              # the image stem, as in the split file
     "category_id": 1,                       # 1-based, in the dataset's class order
     "category": "aeroplane",                # optional when reading; checked against category_id if present
     "score": 0.83,                          # finite; ranks instances across the whole set
     "segmentation": {"size": [h, w], "counts": "..."},   # COCO compressed RLE at the ORIGINAL image size
     "peak": [y, x]}                         # optional: the seeding peak in image pixels (for pointing)

On COCO-format data (`data=coco`) the file uses COCO's own ids, as COCO's tools expect (`ResultIds`): `image_id`
is the image's int id in the annotation file, `category_id` the COCO category id, `category` COCO's name.

RLE encoding and decoding are faster_coco_eval's (the same code the mAP backend uses); its decoder checks that
the runs cover exactly h*w pixels, which pycocotools' does not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faster_coco_eval.core import mask as mask_utils
from torch import Tensor

from ranprm.errors import PredictionsError
from ranprm.prm.instances import Instances
from ranprm.utils.io import write_bytes_atomic

_REQUIRED_KEYS = ("image_id", "category_id", "score", "segmentation")


@dataclass(frozen=True)
class ResultIds:
    """How a results file names images and classes when they are not ranprm's own (image stems, 1-based class
    indices): COCO's int image ids and category ids.

    image_ids:      ranprm image id (the file stem) -> the file's image id
    category_ids:   class index -> the file's category id
    category_names: class index -> the name written as `category`
    """

    image_ids: Mapping[str, int]
    category_ids: Sequence[int]
    category_names: Sequence[str]


def encode_mask(mask: Tensor | np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE `{"size": [h, w], "counts": str}` of a bool mask (H, W)."""
    arr = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"encode_mask needs one (H, W) mask, got shape {arr.shape}")
    rle = mask_utils.encode(np.asfortranarray(arr.astype(np.uint8)))
    counts = rle["counts"]
    return {
        "size": [int(s) for s in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def decode_rle(rle: Mapping[str, Any]) -> Tensor:
    """Bool mask (H, W) of a COCO RLE; compressed (`counts` str) or uncompressed (`counts` list of ints).

    Raises ValueError when the RLE is malformed (bad counts string, runs that do not cover h*w pixels).
    """
    size = rle.get("size")
    if not (
        isinstance(size, list | tuple)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"RLE size must be [h, w] with positive integers, got {size!r}")
    h, w = int(size[0]), int(size[1])
    counts = rle.get("counts")
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("RLE counts list must hold non-negative integers")
        compressed = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    elif isinstance(counts, str):
        compressed = {"size": [h, w], "counts": counts}
    else:
        raise ValueError(f"RLE counts must be a string (or a list of ints), got {type(counts).__name__}")
    try:
        arr = mask_utils.decode(compressed)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"RLE counts are malformed ({err})") from err
    return torch.from_numpy(np.ascontiguousarray(arr)).bool()


def instances_to_results(
    image_id: str, instances: Instances, class_names: Sequence[str], ids: ResultIds | None = None
) -> list[dict[str, Any]]:
    """Result entries of one image's instances (masks at the image's original size); `ids`: COCO's ids instead of
    ranprm's own."""
    masks, labels = instances.masks.detach().cpu(), instances.labels.detach().cpu().tolist()
    scores, peaks = instances.scores.detach().cpu().tolist(), instances.peaks.detach().cpu().double()
    entries = []
    for i, label in enumerate(labels):
        entry: dict[str, Any] = {
            "image_id": image_id if ids is None else ids.image_ids[image_id],
            "category_id": int(label) + 1 if ids is None else ids.category_ids[label],
            "category": class_names[label] if ids is None else ids.category_names[label],
            "score": float(scores[i]),
            "segmentation": encode_mask(masks[i]),
        }
        if bool(torch.isfinite(peaks[i]).all()):
            entry["peak"] = [float(peaks[i, 0]), float(peaks[i, 1])]
        entries.append(entry)
    return entries


def write_results(path: str | Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write a results file atomically, one entry per line so the file stays greppable and diffs small."""
    # allow_nan=False: NaN is not JSON; a NaN score is a bug upstream and must not reach a file silently.
    body = ",\n".join(json.dumps(dict(entry), allow_nan=False, separators=(",", ":")) for entry in results)
    return write_bytes_atomic(path, (("[\n" + body + "\n]\n") if results else "[]\n").encode())


@dataclass
class ImageResults:
    """The validated result entries of one image, masks kept as RLE until asked for.

    A whole VOC val split of decoded masks would take gigabytes; decode one image at a time with
    `to_instances()`.

    image_size: (H, W)
    rles:       N COCO RLE dicts, validated
    labels:     (N,) long   0-based class index
    scores:     (N,) float64
    peaks:      (N, 2) float  (y, x); NaN rows where the entry had no `peak`
    """

    image_size: tuple[int, int]
    rles: list[dict[str, Any]]
    labels: Tensor
    scores: Tensor
    peaks: Tensor

    def __len__(self) -> int:
        return len(self.rles)

    def to_instances(self) -> Instances:
        """`Instances` with decoded masks.

        A results file holds no PRMs: `prms` is a stride-0 view of one zero, so it costs no memory.
        """
        h, w = self.image_size
        if self.rles:
            masks = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(self.rles).transpose(2, 0, 1))).bool()
        else:
            masks = torch.zeros(0, h, w, dtype=torch.bool)
        prms = torch.zeros((), dtype=torch.float32).expand(len(self.rles), h, w)
        return Instances((h, w), masks, self.labels, self.scores, self.peaks, prms)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """`math.isfinite`, but False for an int too large for a float (a 400-digit score) instead of OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def read_results(
    path: str | Path,
    class_names: Sequence[str],
    image_sizes: Mapping[str, tuple[int, int]],
    ids: ResultIds | None = None,
) -> dict[str, ImageResults]:
    """Read and validate a results file against a split.

    image_sizes: {image_id: (H, W)} of every image of the split, at original size.
    ids: how the file names images and classes (COCO's ids); None: image stems and 1-based class indices.
    Returns one `ImageResults` per image of `image_sizes` (in its order), empty where the file has no entry.
    Raises `PredictionsError` (one line naming the file, the entry index and its image) on: unreadable file,
    invalid JSON, not a list, an entry that is not an object, missing keys, image not in the split, unknown
    category id, category name that contradicts the id, non-finite score, malformed RLE or RLE size other
    than the image's size, malformed peak.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise PredictionsError(f"predictions file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise PredictionsError(f"predictions file {path} cannot be read ({err})") from err
    except json.JSONDecodeError as err:
        raise PredictionsError(
            f"predictions file {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from err
    except (ValueError, RecursionError) as err:  # a number of over 4300 digits, nesting deeper than Python's stack
        raise PredictionsError(f"predictions file {path} cannot be parsed ({str(err)[:120]})") from err
    if not isinstance(data, list):
        raise PredictionsError(
            f"predictions file {path} must hold a JSON list of result entries, not {type(data).__name__}"
        )

    num_classes = len(class_names)
    # The file's ids -> ranprm's image id and class index (only the split's images; others are "not in the split").
    image_of = {v: k for k, v in ids.image_ids.items() if k in image_sizes} if ids is not None else None
    label_of = {cid: i for i, cid in enumerate(ids.category_ids)} if ids is not None else None
    rows: dict[str, tuple[list[dict[str, Any]], list[int], list[float], list[list[float]]]] = {
        image_id: ([], [], [], []) for image_id in image_sizes
    }
    for index, entry in enumerate(data):

        def fail(message: str, image: Any = None, index: int = index) -> PredictionsError:
            where = f"entry {index}" + (f" (image {image!r})" if image is not None else "")
            return PredictionsError(f"predictions file {path}, {where}: {message}")

        if not isinstance(entry, dict):
            raise fail(f"expected an object with keys {', '.join(_REQUIRED_KEYS)}, got {type(entry).__name__}")
        image_id = entry.get("image_id")
        missing = [k for k in _REQUIRED_KEYS if k not in entry]
        if missing:
            raise fail(f"missing key(s) {', '.join(missing)}", image_id)
        category_id = entry["category_id"]
        if image_of is not None and label_of is not None:  # COCO's ids
            if not (isinstance(image_id, int) and not isinstance(image_id, bool)):
                raise fail(f"image_id must be the annotation file's int image id, got {image_id!r}", image_id)
            if image_id not in image_of:
                raise fail("image is not in the evaluated split", image_id)
            image_id = image_of[image_id]
            if not (isinstance(category_id, int) and not isinstance(category_id, bool) and category_id in label_of):
                raise fail(f"category_id {category_id!r} is not one of the evaluated classes' COCO ids "
                           f"{list(label_of)}", image_id)  # fmt: skip
            label = label_of[category_id]
            expected_name = ids.category_names[label]  # type: ignore[union-attr]
        else:
            if not isinstance(image_id, str):
                raise fail(f"image_id must be the image stem as a string, got {image_id!r}", image_id)
            if image_id not in image_sizes:
                raise fail("image is not in the evaluated split", image_id)
            if not (
                isinstance(category_id, int) and not isinstance(category_id, bool) and 1 <= category_id <= num_classes
            ):
                raise fail(f"unknown category_id {category_id!r}; expected 1..{num_classes} (1-based)", image_id)
            label = category_id - 1
            expected_name = class_names[label]
        name = entry.get("category")
        if name is not None and name != expected_name:
            raise fail(f"category {name!r} contradicts category_id {category_id} ({expected_name!r})", image_id)
        score = entry["score"]
        if not (_is_number(score) and _is_finite(score)):
            raise fail(f"score must be a finite number, got {score!r}", image_id)
        seg = entry["segmentation"]
        if not isinstance(seg, dict):
            raise fail("segmentation must be a COCO RLE object {size: [h, w], counts: str}", image_id)
        h, w = image_sizes[image_id]
        if seg.get("size") != [h, w]:
            raise fail(f"segmentation size {seg.get('size')!r} differs from the image's size [{h}, {w}]", image_id)
        try:
            decode_rle(seg)  # validation only: the runs must cover exactly h*w pixels
        except ValueError as err:
            raise fail(f"malformed segmentation RLE: {err}", image_id) from err
        peak = entry.get("peak")
        if peak is None:
            yx = [math.nan, math.nan]
        elif isinstance(peak, list) and len(peak) == 2 and all(_is_number(v) and math.isfinite(v) for v in peak):
            yx = [float(peak[0]), float(peak[1])]
        else:
            raise fail(f"peak must be [y, x] with finite numbers, got {peak!r}", image_id)

        rles, labels, scores, peaks = rows[image_id]
        rles.append({"size": [h, w], "counts": seg["counts"]} if isinstance(seg["counts"], str) else seg)
        labels.append(label)
        scores.append(float(score))
        peaks.append(yx)

    out: dict[str, ImageResults] = {}
    for image_id, (rles, labels, scores, peaks) in rows.items():
        h, w = image_sizes[image_id]
        # Uncompressed RLE (counts as a list) is stored compressed: `to_instances` then decodes all alike.
        rles = [r if isinstance(r["counts"], str) else encode_mask(decode_rle(r)) for r in rles]
        out[image_id] = ImageResults(
            image_size=(int(h), int(w)),
            rles=rles,
            labels=torch.tensor(labels, dtype=torch.long),
            scores=torch.tensor(scores, dtype=torch.float64),  # float32 could tie distinct file scores
            peaks=torch.tensor(peaks, dtype=torch.float32).reshape(-1, 2),
        )
    return out
