"""ImageNet-R: one folder per class, split by the official lists (data.split_files) or by our own deterministic
80/20 per-class split, stored once as a checksummed JSON file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import yaml

from cdl_core.config import DataConfig
from cdl_core.data.base import DatasetSource, FileImages, SourceData, default_data_root
from cdl_core.errors import DatasetNotFoundError, SplitFileError, one_line

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TRAIN_FRACTION = 0.8
HOW_TO_GET = (
    "download imagenet-r.tar from the ImageNet-R project (https://github.com/hendrycks/imagenet-r) and extract it "
    "under data.root (or $CDL_DATA_ROOT / ~/.cache/cdl/data) so that <root>/imagenet-r/<wnid>/*.jpg exist"
)
OFFICIAL_LISTS = {"train": "imagenet-r_train.yaml", "test": "imagenet-r_test.yaml"}
GET_OFFICIAL_LISTS = (
    "copy imagenet-r_train.yaml and imagenet-r_test.yaml from GT-RIPL/CODA-Prompt dataloaders/splits/ (also "
    "shipped in IRVLUTD/CDL) into the folder data.split_files names, or set data.split_files to null for our split"
)
FIX_IMAGES = "extract the full imagenet-r.tar there or point data.split_files at lists for your copy"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader: the lists hold 30,000 entries


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


class ListedImage(NamedTuple):
    """One entry of an official split list: <wnid>/<file> under the imagenet-r folder, and its class id."""

    wnid: str
    file: str
    class_id: int


def _relative_image(entry: object, path: Path, k: int) -> tuple[str, str]:
    """(wnid, file) of a listed path: what follows its last `imagenet-r/`, else its last two components."""
    if not isinstance(entry, str):
        raise SplitFileError(f"{path}: data[{k}] is {entry!r}, not an image path; {GET_OFFICIAL_LISTS}")
    after = entry.rpartition("imagenet-r/")[2]
    parts = PurePosixPath(after).parts[-2:]
    if len(parts) != 2 or after.endswith("/") or ".." in parts:
        raise SplitFileError(f"{path}: data[{k}] {entry!r} is not <...>/imagenet-r/<wnid>/<file>; {GET_OFFICIAL_LISTS}")
    return parts[0], parts[1]


def read_official_list(path: Path) -> tuple[list[ListedImage], str]:
    """The entries of one official split list and the sha256 of its bytes; SplitFileError when unusable."""
    if not path.is_file():
        raise SplitFileError(f"official split list {path} not found; {GET_OFFICIAL_LISTS}")
    raw = path.read_bytes()
    try:
        content = yaml.load(raw, Loader=YAML_LOADER)
    except yaml.YAMLError as err:
        raise SplitFileError(f"{path} is not valid YAML ({one_line(err)}); {GET_OFFICIAL_LISTS}") from err
    if not isinstance(content, dict) or not all(isinstance(content.get(k), list) for k in ("data", "targets")):
        raise SplitFileError(f"{path} is not a mapping with lists `data` and `targets`; {GET_OFFICIAL_LISTS}")
    data, targets = content["data"], content["targets"]
    if len(data) != len(targets):
        raise SplitFileError(f"{path} lists {len(data)} images but {len(targets)} targets; {GET_OFFICIAL_LISTS}")
    entries = []
    for k, (entry, target) in enumerate(zip(data, targets)):
        if not isinstance(target, int) or isinstance(target, bool):
            raise SplitFileError(f"{path}: targets[{k}] is {target!r}, not an integer class id; {GET_OFFICIAL_LISTS}")
        entries.append(ListedImage(*_relative_image(entry, path, k), target))
    return entries, hashlib.sha256(raw).hexdigest()


def _wnid_per_id(entries: list[ListedImage], path: Path) -> dict[int, str]:
    """Class id -> wnid as one list gives it: one folder per id, one id per folder, ids 0..n-1."""
    wnid_of: dict[int, str] = {}
    id_of: dict[str, int] = {}
    for e in entries:
        if wnid_of.setdefault(e.class_id, e.wnid) != e.wnid:
            raise SplitFileError(
                f"{path} gives class id {e.class_id} to two folders, {wnid_of[e.class_id]} and {e.wnid}; "
                f"{GET_OFFICIAL_LISTS}"
            )
        if id_of.setdefault(e.wnid, e.class_id) != e.class_id:
            raise SplitFileError(
                f"{path} gives folder {e.wnid} two class ids, {id_of[e.wnid]} and {e.class_id}; {GET_OFFICIAL_LISTS}"
            )
    if sorted(wnid_of) != list(range(len(wnid_of))):  # ids index the classifier's outputs
        raise SplitFileError(
            f"{path} has {len(wnid_of)} class ids from {min(wnid_of, default=None)} to {max(wnid_of, default=None)}, "
            f"not 0..{len(wnid_of) - 1}; {GET_OFFICIAL_LISTS}"
        )
    return wnid_of


def _same_classes(train: dict[int, str], test: dict[int, str], paths: dict[str, Path]) -> None:
    for class_id in sorted(set(train) | set(test)):
        if train.get(class_id) != test.get(class_id):
            raise SplitFileError(
                f"class id {class_id} is {train.get(class_id) or 'absent'} in {paths['train']} but "
                f"{test.get(class_id) or 'absent'} in {paths['test']}; use the two lists of one release together"
            )


def _check_images_exist(folder: Path, lists: dict[str, list[ListedImage]], paths: dict[str, Path]) -> None:
    """Every listed image is in `folder`: one directory listing per class, not one stat per image."""
    present: dict[str, set[str]] = {}
    for part, entries in lists.items():
        for e in entries:
            if e.wnid not in present:
                class_dir = folder / e.wnid
                if not class_dir.is_dir():
                    raise SplitFileError(
                        f"class folder {class_dir} (class id {e.class_id} in {paths[part]}) is missing; {FIX_IMAGES}"
                    )
                present[e.wnid] = set(os.listdir(class_dir))
            if e.file not in present[e.wnid]:
                raise SplitFileError(
                    f"{folder / e.wnid / e.file} listed in {paths[part]} is missing from {folder}; {FIX_IMAGES}"
                )


def _no_image_in_both(lists: dict[str, list[ListedImage]], paths: dict[str, Path]) -> None:
    shared = {(e.wnid, e.file) for e in lists["train"]} & {(e.wnid, e.file) for e in lists["test"]}
    if shared:
        wnid, file = min(shared)
        raise SplitFileError(
            f"{wnid}/{file} (and {len(shared) - 1} more) is listed in both {paths['train']} and {paths['test']}; "
            "test images must not train: use the two lists of one release together"
        )


def load_official(folder: Path, split_files: str) -> SourceData:
    """ImageNet-R divided by the official lists; class ids (and so stream labels) are the lists' targets."""
    lists_dir = Path(split_files).expanduser()
    paths = {part: lists_dir / name for part, name in OFFICIAL_LISTS.items()}
    read = {part: read_official_list(path) for part, path in paths.items()}
    lists = {part: entries for part, (entries, _) in read.items()}
    wnid_of = _wnid_per_id(lists["train"], paths["train"])
    _same_classes(wnid_of, _wnid_per_id(lists["test"], paths["test"]), paths)
    _no_image_in_both(lists, paths)
    _check_images_exist(folder, lists, paths)

    def part(entries: list[ListedImage]) -> tuple[FileImages, np.ndarray]:
        labels = np.array([e.class_id for e in entries], dtype=np.int64)
        return FileImages([folder / e.wnid / e.file for e in entries]), labels

    train_images, train_labels = part(lists["train"])
    test_images, test_labels = part(lists["test"])
    record = {"split": "official", "split_files_sha256": {p: sha for p, (_, sha) in read.items()}}
    class_names = tuple(wnid_of[i] for i in range(len(wnid_of)))
    log.info("ImageNet-R official split from %s: %d train / %d test", lists_dir, len(train_labels), len(test_labels))
    return SourceData(class_names, train_images, train_labels, test_images, test_labels, split=record)


class ImageNetR(DatasetSource):
    name = "imagenet_r"

    @classmethod
    def load(cls, cfg: DataConfig) -> SourceData:
        folder = find_imagenet_r(cfg.root)
        if cfg.split_files is not None:
            return load_official(folder, cfg.split_files)
        split = load_split(folder, cfg.split_seed)
        index = {name: i for i, name in enumerate(split["classes"])}

        def part(files: list[str]) -> tuple[FileImages, np.ndarray]:
            labels = np.array([index[f.split("/", 1)[0]] for f in files], dtype=np.int64)
            return FileImages([folder / f for f in files]), labels

        train_images, train_labels = part(split["train"])
        test_images, test_labels = part(split["test"])
        record = {"split": "ours", "split_seed": cfg.split_seed, "split_train_fraction": split["train_fraction"]}
        return SourceData(tuple(split["classes"]), train_images, train_labels, test_images, test_labels, split=record)
