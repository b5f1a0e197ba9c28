"""Building blocks shared by every dataset: image stores, the per-task dataset, the stream records."""
from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from cdl_core.catalog.datasets import DATASETS, DatasetInfo
from cdl_core.config import DataConfig
from cdl_core.errors import DatasetNotFoundError  # noqa: F401  (defined there; importable here as before)


# How a dataset's train/test division was made, when the dataset's own files make it (CIFAR-100's and
# Fashion-MNIST's train/test files, the synthetic generator's separate train and test draws).
DATASET_SPLIT: dict = {"split": "dataset"}


def default_data_root() -> Path:
    """Where datasets live when data.root is not given: $CDL_DATA_ROOT, else ~/.cache/cdl/data."""
    env = os.environ.get("CDL_DATA_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/cdl/data").expanduser()


class ImageStore(Protocol):
    """Indexable images; item i is a uint8 tensor C x H x W (C = 1 or 3)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> torch.Tensor: ...


class TensorImages:
    """Images held in memory as one uint8 tensor N x C x H x W (small datasets: no decode per item)."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 N x C x H x W tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        # contiguous: views from a channels-last array would slow every later op on the item
        return self.images[i].contiguous()


class FileImages:
    """Images decoded lazily from files with PIL (large datasets such as ImageNet-R)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return pil_to_tensor(img.convert("RGB"))


@dataclass(frozen=True)
class SourceData:
    """A dataset as loaded from disk: original class ids, before any stream choice is made."""

    class_names: tuple[str, ...]
    train_images: ImageStore
    train_labels: np.ndarray  # int64, original class ids, file order
    test_images: ImageStore
    test_labels: np.ndarray
    # which train/test division this is, recorded with the run: {"split": "dataset" | "official" | "ours", ...}
    split: dict = field(default_factory=lambda: dict(DATASET_SPLIT))


class DatasetSource(ABC):
    """One registered dataset: its protocol defaults and how to load it."""

    name: ClassVar[str]  # its entry in cdl_core.catalog.datasets (class count, protocol defaults)

    @classmethod
    def info(cls) -> DatasetInfo:
        return DATASETS[cls.name]

    @classmethod
    @abstractmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        """Read (or generate) the dataset; raise DatasetNotFoundError when its files are missing."""


class StreamDataset(Dataset):
    """Selected images of one split with their stream labels; items are (normalised float tensor, label)."""

    def __init__(
        self,
        images: ImageStore,
        indices: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)  # positions in `images` (the source's file order)
        self.labels = np.asarray(labels, dtype=np.int64)  # stream labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[int(self.indices[k])]), int(self.labels[k])


@dataclass(frozen=True)
class TaskSplit:
    task_id: int
    classes: tuple[int, ...]  # stream labels of this task
    train: Dataset
    val: Dataset  # carved from this task's training images; test transform
    test: Dataset


@dataclass
class ClassIncrementalStream:
    name: str
    n_classes: int
    n_tasks: int
    classes_per_task: int
    image_size: int
    class_order: tuple[int, ...]  # original class ids in stream order: stream label i == class_order[i]
    class_names: tuple[str, ...]  # in stream-label order
    tasks: list[TaskSplit]
    val_fraction: float = 0.0
    split_seed: int = 0
    split: dict = field(default_factory=lambda: dict(DATASET_SPLIT))  # SourceData.split: how train/test was made

    def fingerprint(self) -> str:
        """sha256 over the train/test record, the class order and every chosen sample index, task by task and
        split by split."""
        digest = hashlib.sha256(np.asarray(self.class_order, dtype=np.int64).tobytes())
        # two divisions (e.g. official lists and ours) that happen to give equal indices are still different data
        digest.update(b"|" + json.dumps(self.split, sort_keys=True).encode())
        for task in self.tasks:
            for split in (task.train, task.val, task.test):
                digest.update(b"|")
                digest.update(np.asarray(split.indices, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def describe(self) -> dict:
        """JSON-serialisable record of the split, logged with every run."""
        return {
            "name": self.name,
            "n_classes": self.n_classes,
            "n_tasks": self.n_tasks,
            "classes_per_task": self.classes_per_task,
            "image_size": self.image_size,
            "class_order": list(self.class_order),
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            **self.split,  # "split": "dataset" | "official" (+ split_files_sha256) | "ours" (+ seed, fraction)
            "tasks": [
                {"task_id": t.task_id, "train": len(t.train), "val": len(t.val), "test": len(t.test)}
                for t in self.tasks
            ],
            "fingerprint": self.fingerprint(),
        }
