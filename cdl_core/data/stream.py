"""Turn a dataset into a class-incremental task stream: class order, per-class caps, val carve-out, tasks."""
from __future__ import annotations

import logging

import numpy as np

from cdl_core.catalog.datasets import DATASETS, get_dataset  # noqa: F401 (DATASETS re-exported by cdl_core.data)
from cdl_core.config import DataConfig
from cdl_core.data.base import ClassIncrementalStream, DatasetSource, StreamDataset, TaskSplit
from cdl_core.data.cifar100 import CIFAR100
from cdl_core.data.fashion_mnist import FashionMNIST
from cdl_core.data.imagenet_r import ImageNetR
from cdl_core.data.synthetic import Synthetic
from cdl_core.data.transforms import build_test_transform, build_train_transform
from cdl_core.errors import DataError

log = logging.getLogger(__name__)

# How each catalogued dataset (cdl_core.catalog.datasets.DATASETS: class counts, protocol defaults) is read.
LOADERS: dict[str, type[DatasetSource]] = {cls.name: cls for cls in (FashionMNIST, CIFAR100, ImageNetR, Synthetic)}


def first_per_class(labels: np.ndarray, n_classes: int, cap: int | None) -> list[np.ndarray]:
    """For each original class, the indices of its first `cap` images in file order (all when cap is None)."""
    return [np.flatnonzero(labels == c)[:cap] for c in range(n_classes)]


def carve_val(indices: np.ndarray, fraction: float, seed: int, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Split one class's training indices into (train, val); seeded per class so class order doesn't matter."""
    n_val = int(round(fraction * len(indices)))
    n_val = min(n_val, max(len(indices) - 1, 0))  # never leave a class without training images
    order = np.random.default_rng([seed, cls]).permutation(len(indices))
    return np.sort(indices[order[n_val:]]), np.sort(indices[order[:n_val]])


def resolve_class_order(cfg: DataConfig, n_classes: int) -> tuple[int, ...]:
    if cfg.class_order == "sorted":
        return tuple(range(n_classes))
    return tuple(int(c) for c in np.random.default_rng(cfg.class_order_seed).permutation(n_classes))


def _concat(parts: list[np.ndarray], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-class index arrays, giving each index its class's stream label."""
    stream_labels = [np.full(len(p), lab, dtype=np.int64) for p, lab in zip(parts, labels)]
    return np.concatenate(parts).astype(np.int64), np.concatenate(stream_labels)


def build_stream(
    cfg: DataConfig,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> ClassIncrementalStream:
    """Build the task stream described by `cfg`; image_size/mean/std come from the backbone (mean/std used only
    with data.input_scaling="mean_std")."""
    cfg.validate()
    info = get_dataset(cfg.name)
    n_tasks = info.n_tasks(cfg.n_tasks)
    data = LOADERS[cfg.name].load(cfg)
    n_classes = len(data.class_names)
    if n_classes != info.n_classes:  # e.g. an ImageNet-R extraction missing class folders
        raise DataError(
            f"dataset {cfg.name!r} has {n_classes} classes on disk but {info.n_classes} are expected; its files are "
            "incomplete: extract or download it again"
        )
    per_task = n_classes // n_tasks
    order = resolve_class_order(cfg, n_classes)

    train_cap = cfg.train_per_class if cfg.train_per_class is not None else info.default_train_per_class
    test_cap = cfg.test_per_class if cfg.test_per_class is not None else info.default_test_per_class
    train_by_class = first_per_class(data.train_labels, n_classes, train_cap)
    test_by_class = first_per_class(data.test_labels, n_classes, test_cap)

    normalize = (mean, std) if cfg.input_scaling == "mean_std" else None  # "unit": [0, 1], as the official code
    test_tf = build_test_transform(image_size, normalize, center_crop=info.center_crop_test)
    train_tf = build_train_transform(image_size, normalize, cfg.crop_scale_min) if cfg.train_augment else test_tf

    tasks = []
    for t in range(n_tasks):
        stream_classes = list(range(t * per_task, (t + 1) * per_task))
        originals = [order[s] for s in stream_classes]
        carved = [carve_val(train_by_class[c], cfg.val_fraction, cfg.split_seed, c) for c in originals]
        train_idx, train_lab = _concat([tr for tr, _ in carved], stream_classes)
        val_idx, val_lab = _concat([va for _, va in carved], stream_classes)
        test_idx, test_lab = _concat([test_by_class[c] for c in originals], stream_classes)
        tasks.append(
            TaskSplit(
                task_id=t,
                classes=tuple(stream_classes),
                train=StreamDataset(data.train_images, train_idx, train_lab, train_tf),
                val=StreamDataset(data.train_images, val_idx, val_lab, test_tf),
                test=StreamDataset(data.test_images, test_idx, test_lab, test_tf),
            )
        )

    stream = ClassIncrementalStream(
        name=cfg.name,
        n_classes=n_classes,
        n_tasks=n_tasks,
        classes_per_task=per_task,
        image_size=image_size,
        class_order=order,
        class_names=tuple(data.class_names[c] for c in order),
        tasks=tasks,
        val_fraction=cfg.val_fraction,
        split_seed=cfg.split_seed,
        split=data.split,
    )
    log.info(
        "stream %s: %d tasks x %d classes, %d train / %d val / %d test images, split %s",
        cfg.name, n_tasks, per_task,
        sum(len(t.train) for t in tasks), sum(len(t.val) for t in tasks), sum(len(t.test) for t in tasks),
        stream.fingerprint()[:12],
    )
    return stream
