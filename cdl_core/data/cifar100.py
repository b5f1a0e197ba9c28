"""Split CIFAR-100 (the paper's first benchmark), through torchvision's reader, kept in memory as uint8."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetSource, SourceData, TensorImages, default_data_root
from cdl_core.errors import DatasetNotFoundError

HOW_TO_GET = (
    "set data.download=True when online (torchvision fetches cifar-100-python.tar.gz), or extract that archive "
    "under data.root / $CDL_DATA_ROOT / ~/.cache/cdl/data"
)


def _read(root: Path, train: bool, download: bool):
    from torchvision.datasets import CIFAR100

    looked_at = [root / CIFAR100.base_folder]
    try:
        return CIFAR100(str(root), train=train, download=download)
    except RuntimeError as err:
        # torchvision says "Dataset not found or corrupted"; anything else is a real failure
        if "not found" not in str(err).lower():
            raise
        raise DatasetNotFoundError("cifar100", looked_at, HOW_TO_GET) from err
    except OSError as err:  # a download attempted offline
        raise DatasetNotFoundError("cifar100", looked_at, f"download failed ({err}); {HOW_TO_GET}") from err


class CIFAR100(DatasetSource):
    name = "cifar100"

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
        train = _read(root, True, cfg.download)
        test = _read(root, False, False)
        # torchvision gives N x H x W x C; a permuted view avoids copying 150 MB
        return SourceData(
            tuple(train.classes),
            TensorImages(torch.from_numpy(train.data).permute(0, 3, 1, 2)),
            np.asarray(train.targets, dtype=np.int64),
            TensorImages(torch.from_numpy(test.data).permute(0, 3, 1, 2)),
            np.asarray(test.targets, dtype=np.int64),
        )
