"""Train/test transforms on uint8 image tensors (torchvision.transforms.v2, no PIL round trip).

Augmentation randomness comes from torch's global RNG, which the trainer seeds, so runs are reproducible.
`normalize`: (mean, std) to normalise with, or None to leave images in [0, 1] (data.input_scaling="unit", as the
official CDL code feeds its ViTs).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

Transform = Callable[[torch.Tensor], torch.Tensor]
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]


def _finish(normalize: Normalization | None) -> list[v2.Transform]:
    # geometry runs first so grayscale images are resized on one channel, then widened to three
    steps = [v2.RGB(), v2.ToDtype(torch.float32, scale=True)]
    return steps + ([v2.Normalize(list(normalize[0]), list(normalize[1]))] if normalize is not None else [])


def build_test_transform(image_size: int, normalize: Normalization | None, center_crop: bool = False) -> Transform:
    """Resize(S) or, ImageNet-style, Resize(S*256/224) + CenterCrop(S); then scale to [0, 1] (and normalise)."""
    if center_crop:
        geometry = [v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    else:
        # (S, S), not S: non-square images must still come out S x S
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    return v2.Compose(geometry + _finish(normalize))


def build_train_transform(image_size: int, normalize: Normalization | None, crop_scale_min: float) -> Transform:
    """RandomResizedCrop(S, scale=(crop_scale_min, 1)) + horizontal flip; then scale to [0, 1] (and normalise)."""
    geometry = [
        v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    return v2.Compose(geometry + _finish(normalize))
