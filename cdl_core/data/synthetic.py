"""A tiny generated dataset for fast end-to-end tests: 10 easily separable classes of 32x32 RGB images.

Class c = a class-specific background colour plus a bright square at a class-specific grid position, with a
one-pixel position jitter and mild noise, so even a frozen random ViT + linear head beats chance clearly.
"""
from __future__ import annotations

import numpy as np
import torch

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetSource, SourceData, TensorImages

N_CLASSES = 10
SIZE = 32
SQUARE = 8
NOISE_STD = 12.0
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128),
    ],
    dtype=np.float32,
)
CLASS_NAMES = tuple(f"pattern{c}" for c in range(N_CLASSES))


def generate(n_per_class: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Images (N,3,32,32) uint8 and labels, classes interleaved like a shuffled real dataset."""
    labels = np.tile(np.arange(N_CLASSES, dtype=np.int64), n_per_class)
    images = np.broadcast_to(0.5 * PALETTE[labels][:, :, None, None], (len(labels), 3, SIZE, SIZE)).copy()
    for i, c in enumerate(labels):
        row, col = divmod(int(c), 4)  # a 3 x 4 grid of positions, one per class
        top = int(np.clip(2 + 10 * row + rng.integers(-1, 2), 0, SIZE - SQUARE))
        left = int(np.clip(8 * col + rng.integers(-1, 2), 0, SIZE - SQUARE))
        images[i, :, top : top + SQUARE, left : left + SQUARE] = 250.0
    images += rng.normal(0.0, NOISE_STD, size=images.shape)
    return torch.from_numpy(np.clip(np.rint(images), 0, 255).astype(np.uint8)), labels


class Synthetic(DatasetSource):
    name = "synthetic"

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        # generate exactly what the caps ask for; independent seeds per split keep test fixed when train grows
        n_train = cfg.train_per_class or cls.info().default_train_per_class
        n_test = cfg.test_per_class or cls.info().default_test_per_class
        train_x, train_y = generate(n_train, np.random.default_rng([cfg.split_seed, 0]))
        test_x, test_y = generate(n_test, np.random.default_rng([cfg.split_seed, 1]))
        return SourceData(CLASS_NAMES, TensorImages(train_x), train_y, TensorImages(test_x), test_y)
