"""Fashion-MNIST from its idx .gz files: the offline demo stream (Debian package dataset-fashion-mnist).

`python -m cdl_core.data.obtain` (`make data`) puts the files where `candidate_dirs` looks.
"""
from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetSource, SourceData, TensorImages, default_data_root
from cdl_core.errors import DatasetCorruptError, DatasetNotFoundError, one_line

log = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the package dataset-fashion-mnist puts them
# Fixed system locations searched after data.root; a module-level tuple so tests can patch it away, and
# $CDL_FASHION_MNIST_SYSTEM_DIRS (os.pathsep-separated, may be empty) so a subprocess can too.
SYSTEM_DIRS: tuple[Path, ...] = tuple(
    Path(p) for p in os.environ.get("CDL_FASHION_MNIST_SYSTEM_DIRS", str(DEBIAN_DIR)).split(os.pathsep) if p
)
HOW_TO_GET = (
    "run `make data` (or `python -m cdl_core.data.obtain`: `apt-get install dataset-fashion-mnist` on Debian, "
    "else a download), or put the idx .gz files in data.root, or set data.download=True when online"
)
REFETCH = "delete it and run `make data` (or `python -m cdl_core.data.obtain`) again"


def candidate_dirs(root: str | None) -> list[Path]:
    """Folders searched for the .gz files, in order."""
    dirs: list[Path] = []
    if root:
        base = Path(root).expanduser()
        dirs += [base, base / "FashionMNIST" / "raw"]  # plain folder, or torchvision's layout
    dirs += list(SYSTEM_DIRS)
    env = os.environ.get("CDL_DATA_ROOT")
    caches = ([Path(env).expanduser()] if env else []) + [Path("~/.cache/cdl/data").expanduser()]
    for cache in caches:
        # our folder, or what torchvision's download into the cache writes (`download_fashion_mnist`)
        dirs += [cache / "fashion-mnist", cache / "FashionMNIST" / "raw"]
    return dirs


def has_files(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in FILES.values() for name in pair)


def find_fashion_mnist(root: str | None = None) -> Path | None:
    """The first of `candidate_dirs(root)` holding all four files, or None."""
    return next((d for d in candidate_dirs(root) if has_files(d)), None)


def download_fashion_mnist(target: Path) -> Path:
    """torchvision's download into target/FashionMNIST/raw (the .gz files are kept there); returns that folder."""
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    TorchvisionFashionMNIST(str(target), train=True, download=True)  # fetches all four files
    return target / "FashionMNIST" / "raw"


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped idx file (the MNIST format: magic, big-endian dims, uint8 payload)."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # cut short, or not gzip at all
        raise DatasetCorruptError(f"{path} is not a complete gzip file ({one_line(err)}); {REFETCH}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetCorruptError(f"{path} is not a uint8 idx file (bad magic); {REFETCH}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetCorruptError(f"{path} is truncated (its header is cut short); {REFETCH}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetCorruptError(f"{path} is truncated ({data.size} values for shape {dims}); {REFETCH}")
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
            raise DatasetCorruptError(
                f"{directory}: {len(images)} {split} images but {len(labels)} labels; delete the folder's "
                "idx files and run `make data` (or `python -m cdl_core.data.obtain`) again"
            )
        out += [torch.from_numpy(images.copy()).unsqueeze(1), labels]
    log.info("read Fashion-MNIST from %s", directory)
    return out[0], out[1], out[2], out[3]


def load_fashion_mnist(
    root: str | None = None, download: bool = False
) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Train images (N,1,28,28) uint8, train labels, test images, test labels; raises DatasetNotFoundError."""
    found = find_fashion_mnist(root)
    if found is not None:
        return _read_folder(found.resolve())
    dirs = candidate_dirs(root)
    if download:
        target = Path(root).expanduser() if root else default_data_root()
        try:
            raw = download_fashion_mnist(target)
        except (RuntimeError, OSError) as err:
            raise DatasetNotFoundError("fashion_mnist", dirs, f"download failed ({err}); {HOW_TO_GET}") from err
        return _read_folder(raw.resolve())
    raise DatasetNotFoundError("fashion_mnist", dirs, HOW_TO_GET)


class FashionMNIST(DatasetSource):
    name = "fashion_mnist"

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        train_x, train_y, test_x, test_y = load_fashion_mnist(cfg.root, cfg.download)
        return SourceData(CLASS_NAMES, TensorImages(train_x), train_y, TensorImages(test_x), test_y)
