"""Class-incremental data streams (fashion_mnist, cifar100, imagenet_r, synthetic) and pretraining sources.

`build_stream(cfg.data, image_size, mean, std)` returns the task stream a learner trains on; `DATASETS` is the
registry of dataset names `DataConfig.name` may take.

The names load their module on first use, so importing a light submodule (`python -m cdl_core.data.obtain`)
does not import torch through this package.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cdl_core.errors import DatasetCorruptError, DatasetNotFoundError, SplitFileError

if TYPE_CHECKING:
    from cdl_core.data.base import ClassIncrementalStream, DatasetSource, StreamDataset, TaskSplit
    from cdl_core.data.pretrain_sources import fashion_mnist_heldout, load_mnist_digits
    from cdl_core.data.stream import DATASETS, build_stream

_LAZY = {
    "ClassIncrementalStream": "cdl_core.data.base",
    "DatasetSource": "cdl_core.data.base",
    "StreamDataset": "cdl_core.data.base",
    "TaskSplit": "cdl_core.data.base",
    "fashion_mnist_heldout": "cdl_core.data.pretrain_sources",
    "load_mnist_digits": "cdl_core.data.pretrain_sources",
    "DATASETS": "cdl_core.data.stream",
    "build_stream": "cdl_core.data.stream",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:  # AttributeError lets `from cdl_core.data import <submodule>` import the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


__all__ = [
    "DATASETS",
    "ClassIncrementalStream",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "DatasetSource",
    "SplitFileError",
    "StreamDataset",
    "TaskSplit",
    "build_stream",
    "fashion_mnist_heldout",
    "load_mnist_digits",
]
