"""Fashion-MNIST from its idx .gz files: the offline demo stream (Debian package dataset-fashion-mnist)."""
from __future__ import annotations

import functools
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import torch

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetNotFoundError, DatasetSource, SourceData, TensorImages, default_data_root

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fixed system locations searched after data.root; a module-level tuple so tests can patch it away.
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
HOW_TO_GET = (
    "`apt-get install dataset-fashion-mnist`, or put the idx .gz files in data.root, "
    "or set data.download=True when online"
)


def candidate_dirs(root: str | None) -> list[Path]:
    """Folders searched for the .gz files, in order."""
    dirs: list[Path] = []
    if root:
        base = Path(root).expanduser()
        dirs += [base, base / "FashionMNIST" / "raw"]  # plain folder, or torchvision's layout
    dirs += list(SYSTEM_DIRS)
    env = os.environ.get("CDL_DATA_ROOT")
    if env:
        dirs.append(Path(env).expanduser() / "fashion-mnist")
    dirs.append(Path("~/.cache/cdl/data/fashion-mnist").expanduser())
    return dirs


def _has_files(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in FILES.values() for name in pair)


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped idx file (the MNIST format: magic, big-endian dims, uint8 payload)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 idx file; delete it and fetch the dataset again")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated ({data.size} values for shape {dims}); fetch it again")
    return data.reshape(dims)


@functools.lru_cache(maxsize=2)
def _read_folder(directory: Path) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    # cached: one process builds several streams (tests, pretraining + stream) from the same 47 MB of files
    out: list = []
    for split in ("train", "test"):
        images_file, labels_file = FILES[split]
        images = read_idx(directory / images_file)
        labels = read_idx(directory / labels_file).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{directory}: {len(images)} {split} images but {len(labels)} labels")
        out += [torch.from_numpy(images.copy()).unsqueeze(1), labels]
    log.info("read Fashion-MNIST from %s", directory)
    return out[0], out[1], out[2], out[3]


def load_fashion_mnist(
    root: str | None = None, download: bool = False
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Train images (N,1,28,28) uint8, train labels, test images, test labels; raises DatasetNotFoundError."""
    dirs = candidate_dirs(root)
    for directory in dirs:
        if _has_files(directory):
            return _read_folder(directory.resolve())
    if download:
        from torchvision.datasets import FashionMNIST

        target = Path(root).expanduser() if root else default_data_root()
        try:
            FashionMNIST(str(target), train=True, download=True)
        except (RuntimeError, OSError) as err:
            raise DatasetNotFoundError("fashion_mnist", dirs, f"download failed ({err}); {HOW_TO_GET}") from err
        return _read_folder((target / "FashionMNIST" / "raw").resolve())
    raise DatasetNotFoundError("fashion_mnist", dirs, HOW_TO_GET)


class FashionMNIST(DatasetSource):
    name = "fashion_mnist"
    default_n_tasks = 5
    default_train_per_class = 600
    default_test_per_class = 200

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root, cfg.download)
        return SourceData(CLASS_NAMES, TensorImages(train_x), train_y, TensorImages(test_x), test_y)
