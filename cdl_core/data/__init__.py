"""Class-incremental data streams (fashion_mnist, cifar100, imagenet_r, synthetic) and pretraining sources.

`build_stream(cfg.data, image_size, mean, std)` returns the task stream a learner trains on; `DATASETS` is the
registry of dataset names `DataConfig.name` may take.
"""
from cdl_core.data.base import (
    ClassIncrementalStream,
    DatasetNotFoundError,
    DatasetSource,
    StreamDataset,
    TaskSplit,
)
from cdl_core.data.imagenet_r import SplitFileError
from cdl_core.data.pretrain_sources import fashion_mnist_heldout, load_mnist_digits
from cdl_core.data.stream import DATASETS, build_stream

__all__ = [
    "DATASETS",
    "ClassIncrementalStream",
    "DatasetNotFoundError",
    "DatasetSource",
    "SplitFileError",
    "StreamDataset",
    "TaskSplit",
    "build_stream",
    "fashion_mnist_heldout",
    "load_mnist_digits",
]
