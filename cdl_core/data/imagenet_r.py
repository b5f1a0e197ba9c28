"""ImageNet-R: one folder per class, a deterministic 80/20 split stored once as a checksummed JSON file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetSource, FileImages, SourceData, default_data_root
from cdl_core.errors import DatasetNotFoundError, SplitFileError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TRAIN_FRACTION = 0.8
HOW_TO_GET = (
    "download imagenet-r.tar from the ImageNet-R project (https://github.com/hendrycks/imagenet-r) and extract it "
    "under data.root (or $CDL_DATA_ROOT / ~/.cache/cdl/data) so that <root>/imagenet-r/<wnid>/*.jpg exist"
)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and _images_in(d))


def find_imagenet_r(root: str | None) -> Path:
    """The folder holding one sub-folder per class: <root>/imagenet-r, or root itself."""
    base = Path(root).expanduser() if root else default_data_root()
    candidates = [base / "imagenet-r", base]
    for folder in candidates:
        if _class_dirs(folder):
            return folder
    raise DatasetNotFoundError("imagenet_r", candidates, HOW_TO_GET)


def split_file(folder: Path, seed: int) -> Path:
    """Where the split of `folder` (the imagenet-r folder) is stored; its checksum sits at <file>.sha256."""
    return folder.parent / f"imagenet-r-split-seed{seed}.json"


def _make_split(folder: Path, seed: int) -> dict:
    classes = [d.name for d in _class_dirs(folder)]
    train: list[str] = []
    test: list[str] = []
    for idx, name in enumerate(classes):
        files = [f"{name}/{p.name}" for p in _images_in(folder / name)]
        # seeded per class, so adding a class folder leaves every other class's split unchanged
        order = np.random.default_rng([seed, idx]).permutation(len(files))
        n_train = int(round(TRAIN_FRACTION * len(files)))
        train += sorted(files[i] for i in order[:n_train])
        test += sorted(files[i] for i in order[n_train:])
    return {"seed": seed, "train_fraction": TRAIN_FRACTION, "classes": classes, "train": train, "test": test}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # rename: concurrent readers never see half a file
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_split(folder: Path, seed: int) -> dict:
    """Read and verify the stored split, or make and store it on first use."""
    path = split_file(folder, seed)
    checksum_path = path.with_name(path.name + ".sha256")
    regenerate = f"delete {path} and {checksum_path} to regenerate the split"
    if not path.exists():
        split = _make_split(folder, seed)
        data = json.dumps(split, indent=1).encode()
        _write_atomic(path, data)
        _write_atomic(checksum_path, (hashlib.sha256(data).hexdigest() + "\n").encode())
        log.info("wrote ImageNet-R split %s (%d train / %d test)", path, len(split["train"]), len(split["test"]))
        return split
    data = path.read_bytes()
    if not checksum_path.is_file():
        raise SplitFileError(f"{path} has no checksum file {checksum_path}; {regenerate}")
    if hashlib.sha256(data).hexdigest() != checksum_path.read_text().strip():
        raise SplitFileError(f"{path} does not match its sha256 in {checksum_path} (edited or corrupted); {regenerate}")
    split = json.loads(data)
    found = [d.name for d in _class_dirs(folder)]
    if split["seed"] != seed or split["classes"] != found:
        raise SplitFileError(f"{path} was made for other class folders than those in {folder}; {regenerate}")
    return split


class ImageNetR(DatasetSource):
    name = "imagenet_r"

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        folder = find_imagenet_r(cfg.root)
        split = load_split(folder, cfg.split_seed)
        index = {name: i for i, name in enumerate(split["classes"])}

        def part(files: list[str]) -> tuple[FileImages, np.ndarray]:
            labels = np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)
            return FileImages([folder / f for f in files]), labels

        train_images, train_labels = part(split["train"])
        test_images, test_labels = part(split["test"])
        return SourceData(tuple(split["classes"]), train_images, train_labels, test_images, test_labels)
