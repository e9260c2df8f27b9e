"""`Instances`: the predicted instances of one image, every field indexed together (detectron2's habit)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Instances:
    """Instances of one image of size `image_size = (H, W)`.

    masks:  (N, H, W) bool   instance masks at the image size
    labels: (N,) long        0-based class index in the dataset's class order
    scores: (N,) float       confidence used to rank instances across the whole dataset (see ranprm.prm.retrieval)
    peaks:  (N, 2) float     (y, x) of the seeding peak, in image pixels
    prms:   (N, H, W) float  the peak response map each instance came from, normalised to [0, 1]
    """

    image_size: tuple[int, int]
    masks: Tensor
    labels: Tensor
    scores: Tensor
    peaks: Tensor
    prms: Tensor

    def __post_init__(self) -> None:
        n = len(self.labels)
        for f in self._tensor_fields():
            if len(getattr(self, f)) != n:
                raise ValueError(f"Instances field {f!r} has {len(getattr(self, f))} rows, labels has {n}")

    @staticmethod
    def _tensor_fields() -> list[str]:
        return [f.name for f in fields(Instances) if f.name != "image_size"]

    @classmethod
    def empty(cls, image_size: tuple[int, int], device: torch.device | str = "cpu") -> Instances:
        h, w = image_size
        return cls(
            image_size=(h, w),
            masks=torch.zeros(0, h, w, dtype=torch.bool, device=device),
            labels=torch.zeros(0, dtype=torch.long, device=device),
            scores=torch.zeros(0, device=device),
            peaks=torch.zeros(0, 2, device=device),
            prms=torch.zeros(0, h, w, device=device),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | slice | Tensor) -> Instances:
        """The instances selected by `index` (an int keeps one; out of range raises IndexError, as a list does)."""
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"instance index {index} is out of range for {n} instances")
            index = slice(index % n, index % n + 1)
        return Instances(self.image_size, **{f: getattr(self, f)[index] for f in self._tensor_fields()})

    def to(self, device: torch.device | str) -> Instances:
        return Instances(self.image_size, **{f: getattr(self, f).to(device) for f in self._tensor_fields()})
