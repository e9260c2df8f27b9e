"""Image transforms (torchvision v2): masks wrapped as `tv_tensors.Mask` follow every geometric step."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(image_size: int, train: bool, flip_prob: float = 0.5) -> v2.Compose:
    """Resize to `image_size` x `image_size`, flip (training only), scale to [0, 1], ImageNet normalisation."""
    steps: list[v2.Transform] = [v2.Resize((image_size, image_size), antialias=True)]
    if train and flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(flip_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)
