"""Images from files, for `ranprm-predict`: the list of inputs, and a Dataset that reads them one by one.

An unreadable file does not raise in the Dataset (a loader worker's exception reaches the main process only as
a re-wrapped traceback): it becomes a `BadImage` record that travels with the batch, so the caller decides whether
to skip it or stop (`on_bad_image`) with a one-line message naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ranprm.data.voc import read_image
from ranprm.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(path: str | Path) -> list[Path]:
    """The image files of `path` (a file, or a folder's images in name order, not recursive); stems are unique
    (a stem is the image_id in predictions.json)."""
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"input={str(path)!r} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.exists():
        raise DataError(f"input={str(path)!r} does not exist; give an image file or a folder of images")
    if not path.is_dir():
        raise DataError(f"input={str(path)!r} is neither a file nor a folder")
    named = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    images = [p for p in named if p.is_file()]
    # An image name that is no file to read (a symbolic link in a loop or to nothing, a folder): counted and named,
    # not silently dropped, so the number of overlays adds up.
    unreadable = [p.name for p in named if not p.is_file()]
    if unreadable:
        shown = ", ".join(unreadable[:5]) + (f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        log.warning("input=%r: skipped %d image name(s) that are not readable files (a broken or looping symbolic "
                    "link, a folder): %s", str(path), len(unreadable), shown)  # fmt: skip
    if not images:
        raise DataError(
            f"input={str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); nothing to predict"
            + (f" ({len(unreadable)} image name(s) are not readable files)" if unreadable else "")
        )
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise DataError(
                f"input={str(path)!r}: {stems[p.stem].name} and {p.name} share the stem {p.stem!r}, which is "
                "the image_id in predictions.json; rename one"
            )
        stems[p.stem] = p
    return images


@dataclass  # not frozen: Lightning's batch transfer rebuilds dataclasses field by field
class BadImage:
    """An input that could not be read: its position in the input list, its path and why."""

    index: int
    path: Path
    error: DataError


class ImageFileDataset(Dataset[dict[str, Any]]):
    """Samples `{"index", "path", "image" (3, S, S) float, "orig_size" (H, W), "raw_image" (H, W, 3) uint8}`
    or `{"index", "path", "bad": BadImage}` for a file that cannot be read."""

    def __init__(self, paths: list[Path], transform: v2.Transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image = read_image(path)  # (3, H, W) uint8 RGB, whatever the file's mode
        except DataError as err:
            return {"index": index, "path": path, "bad": BadImage(index, path, err)}
        return {
            "index": index,
            "path": path,
            "image": self.transform(image),
            "orig_size": (int(image.shape[1]), int(image.shape[2])),
            "raw_image": image.permute(1, 2, 0).numpy(),
        }


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable images (`image` only when there is one); keep the rest as lists, and every
    unreadable file in `bad`, in input order."""

    good = [s for s in samples if "bad" not in s]
    batch: dict[str, Any] = {"bad": [s["bad"] for s in samples if "bad" in s]}
    for key in ("index", "path", "orig_size", "raw_image"):
        batch[key] = [s[key] for s in good]
    if good:
        batch["image"] = torch.stack([s["image"] for s in good])
    return batch
