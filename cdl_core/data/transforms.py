"""Train/test transforms on uint8 image tensors (torchvision.transforms.v2, no PIL round trip).

Augmentation randomness comes from torch's global RNG, which the trainer seeds, so runs are reproducible.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Transform = Callable[[torch.Tensor], torch.Tensor]


def _finish(mean: tuple[float, float, float], std: tuple[float, float, float]) -> list[v2.Transform]:
    # geometry runs first so grayscale images are resized on one channel, then widened to three
    return [v2.RGB(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_test_transform(
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    center_crop: bool = False,
) -> Transform:
    """Resize(S) or, ImageNet-style, Resize(S*256/224) + CenterCrop(S); then normalise."""
    if center_crop:
        geometry = [v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    else:
        # (S, S), not S: non-square images must still come out S x S
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    return v2.Compose(geometry + _finish(mean, std))


def build_train_transform(
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    crop_scale_min: float,
) -> Transform:
    """RandomResizedCrop(S, scale=(crop_scale_min, 1)) + horizontal flip; then normalise."""
    geometry = [
        v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    return v2.Compose(geometry + _finish(mean, std))
