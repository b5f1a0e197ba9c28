"""Tests of cdl_core.data: streams, splits, transforms, missing-data errors and pretraining sources."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdl_core.config import ConfigError, DataConfig
from cdl_core.data import (
    DATASETS,
    DatasetNotFoundError,
    SplitFileError,
    build_stream,
    fashion_mnist_heldout,
    load_mnist_digits,
)
from cdl_core.data import fashion_mnist as fmnist_module
from cdl_core.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from cdl_core.data.stream import LOADERS
from cdl_core.errors import DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not DEBIAN_FMNIST.is_dir(), reason="needs `apt-get install dataset-fashion-mnist`"
)
MEAN = (0.2, 0.4, 0.6)
STD = (0.5, 0.25, 0.125)


def _stream(size: int = 32, **kw):
    # a validation split and mean/std scaling (the timm protocol's) so these tests see both at work
    return build_stream(DataConfig(**({"val_fraction": 0.1, "input_scaling": "mean_std"} | kw)), size, MEAN, STD)


def test_registry_names():
    assert set(DATASETS) == {"fashion_mnist", "cifar100", "imagenet_r", "synthetic"}


@needs_fmnist
def test_fashion_mnist_stream_has_tasks_caps_shapes_and_normalisation():
    stream = _stream(train_augment=False)
    assert (stream.n_classes, stream.n_tasks, stream.classes_per_task) == (10, 5, 2)
    assert stream.class_names == CLASS_NAMES
    for t, task in enumerate(stream.tasks):
        assert task.classes == (2 * t, 2 * t + 1)
        assert set(task.train.labels) == set(task.classes) == set(task.val.labels) == set(task.test.labels)
        # 600 train images per class, 10% of them carved out as val; 200 test images per class
        assert (len(task.train), len(task.val), len(task.test)) == (1080, 120, 400)
    x, y = stream.tasks[3].test[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y in (6, 7)
    # grayscale -> 3 channels, then normalised per channel: a black pixel becomes -mean/std in each channel
    black = torch.tensor([-m / s for m, s in zip(MEAN, STD)])
    assert torch.allclose(x.amin(dim=(1, 2)), black, atol=1e-5)


@needs_fmnist
def test_train_augmentation_is_random_but_seeded_by_torch():
    task = _stream(size=24).tasks[0]
    torch.manual_seed(0)
    a = task.train[0][0]
    b = task.train[0][0]
    torch.manual_seed(0)
    assert a.shape == (3, 24, 24)
    assert not torch.equal(a, b) and torch.equal(a, task.train[0][0])


@needs_fmnist
def test_class_order_sorted_and_shuffled_labels_follow_permutation():
    assert _stream().class_order == tuple(range(10))
    shuffled = _stream(class_order="shuffled", class_order_seed=3)
    assert sorted(shuffled.class_order) == list(range(10)) and shuffled.class_order != tuple(range(10))
    assert _stream(class_order="shuffled", class_order_seed=3).class_order == shuffled.class_order
    assert _stream(class_order="shuffled", class_order_seed=4).class_order != shuffled.class_order
    assert shuffled.class_names == tuple(CLASS_NAMES[c] for c in shuffled.class_order)
    _, _, _, raw_test_labels = load_fashion_mnist()
    for task in shuffled.tasks:
        originals = raw_test_labels[task.test.indices]
        expected = [shuffled.class_order.index(int(c)) for c in originals]
        assert task.test.labels.tolist() == expected
        assert task.test[0][1] == expected[0]


@needs_fmnist
def test_val_split_is_disjoint_from_train_and_seeded():
    a, b, c = _stream(split_seed=0), _stream(split_seed=0), _stream(split_seed=1)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert not set(ta.train.indices) & set(ta.val.indices)
        assert np.array_equal(ta.val.indices, tb.val.indices)
        assert not np.array_equal(ta.val.indices, tc.val.indices)
        assert set(ta.train.indices) | set(ta.val.indices) == set(tc.train.indices) | set(tc.val.indices)


@needs_fmnist
def test_describe_fingerprint_identifies_the_split():
    record = _stream().describe()
    assert json.loads(json.dumps(record)) == record
    assert record["tasks"][0] == {"task_id": 0, "train": 1080, "val": 120, "test": 400}
    assert record["val_fraction"] == 0.1 and record["split_seed"] == 0
    assert _stream().describe()["fingerprint"] == record["fingerprint"]
    assert _stream(split_seed=1).describe()["fingerprint"] != record["fingerprint"]
    assert _stream(class_order="shuffled").describe()["fingerprint"] != record["fingerprint"]


def test_n_tasks_must_divide_classes():
    with pytest.raises(ConfigError, match="n_tasks=3"):
        _stream(name="synthetic", n_tasks=3)


def test_missing_cifar100_names_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar100") as err:
        _stream(name="cifar100", root=str(tmp_path))
    assert str(tmp_path / "cifar-100-python") in str(err.value) and "download" in str(err.value)


def test_missing_fashion_mnist_lists_every_path(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIRS", ())
    monkeypatch.setenv("CDL_DATA_ROOT", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    bad = tmp_path / "nothing-here"
    with pytest.raises(DatasetNotFoundError) as err:
        _stream(root=str(bad))
    message = str(err.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    for looked in (bad, bad / "FashionMNIST" / "raw", tmp_path / "env" / "fashion-mnist"):
        assert str(looked) in message


@needs_fmnist
def test_fashion_mnist_reads_torchvision_layout_under_root(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_module, "SYSTEM_DIRS", ())
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DEBIAN_FMNIST.glob("*.gz"):
        (raw / f.name).symlink_to(f)
    assert len(_stream(root=str(tmp_path)).tasks[0].test) == 400


def _fake_imagenet_r(root: Path, n_classes: int = 200, per_class: int = 5) -> Path:
    """ImageNet-R's layout with tiny images: all 200 class folders unless asked for fewer."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        folder = root / "imagenet-r" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # non-square on purpose
            Image.fromarray(pixels).save(folder / f"img{i}.jpg")
    return root


def test_imagenet_r_split_is_80_20_stored_and_verified(tmp_path):
    root = _fake_imagenet_r(tmp_path)
    kw = dict(name="imagenet_r", root=str(root), n_tasks=2, val_fraction=0.25)
    stream = _stream(size=24, **kw)
    assert (stream.n_classes, stream.classes_per_task) == (200, 100)
    for task in stream.tasks:
        assert (len(task.train) + len(task.val), len(task.test)) == (100 * 4, 100 * 1)
    x, y = stream.tasks[1].test[0]
    assert x.shape == (3, 24, 24) and 100 <= y < 200

    split_path = root / "imagenet-r-split-seed0.json"
    checksum = Path(str(split_path) + ".sha256")
    data = split_path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == checksum.read_text().strip()
    split = json.loads(data)
    assert len(split["train"]) == 800 and len(split["test"]) == 200 and not set(split["train"]) & set(split["test"])

    # a second build reads the stored split back unchanged; root may also point at the imagenet-r folder
    again = _stream(size=24, **{**kw, "root": str(root / "imagenet-r")})
    assert split_path.read_bytes() == data
    assert again.describe()["fingerprint"] == stream.describe()["fingerprint"]

    split["test"], split["train"] = split["train"][:200], split["train"][200:] + split["test"]
    split_path.write_text(json.dumps(split, indent=1))
    with pytest.raises(SplitFileError, match="delete"):
        _stream(size=24, **kw)


def test_imagenet_r_with_missing_class_folders_is_refused(tmp_path):
    root = _fake_imagenet_r(tmp_path, n_classes=7, per_class=2)
    with pytest.raises(DataError, match="has 7 classes on disk but 200 are expected"):
        _stream(name="imagenet_r", root=str(root))


def test_every_catalogued_dataset_has_a_loader():
    assert set(LOADERS) == set(DATASETS)


def test_missing_imagenet_r_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="imagenet-r.tar") as err:
        _stream(name="imagenet_r", root=str(tmp_path))
    assert str(tmp_path / "imagenet-r") in str(err.value)


def test_synthetic_is_deterministic_and_separable():
    a = _stream(name="synthetic", train_augment=False)
    b = _stream(name="synthetic", train_augment=False)
    assert a.describe() == b.describe()
    assert torch.equal(a.tasks[2].train[7][0], b.tasks[2].train[7][0])
    other_seed = _stream(name="synthetic", train_augment=False, split_seed=1)
    assert not torch.equal(a.tasks[2].train[7][0], other_seed.tasks[2].train[7][0])
    assert _stream(size=48, name="synthetic").tasks[0].train[0][0].shape == (3, 48, 48)

    def stack(datasets):
        items = [ds[i] for ds in datasets for i in range(len(ds))]
        return torch.stack([x.flatten() for x, _ in items]), torch.tensor([y for _, y in items])

    train_x, train_y = stack([t.train for t in a.tasks])
    test_x, test_y = stack([t.test for t in a.tasks])
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(a.n_classes)])
    predictions = torch.cdist(test_x, means).argmin(1)
    assert (predictions == test_y).float().mean() > 0.8


def test_load_mnist_digits():
    images, labels = load_mnist_digits()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.equal(labels.bincount(), torch.full((10,), 500))
    assert images.float().mean() > 10  # real digits, not zeros


@needs_fmnist
def test_fashion_mnist_heldout_never_overlaps_the_stream():
    cfg = DataConfig()
    stream = build_stream(cfg, 32, MEAN, STD)
    used = {
        split.images[int(i)].numpy().tobytes()
        for task in stream.tasks
        for split in (task.train, task.val)
        for i in split.indices
    }
    images, labels = fashion_mnist_heldout(cfg)
    assert len(images) >= 60000 - len(used) - 100 and images.shape[1:] == (1, 28, 28)
    assert not used & {img.numpy().tobytes() for img in images}
    few, few_labels = fashion_mnist_heldout(cfg, limit=50)
    assert len(few) == 50 and torch.equal(few_labels.bincount(), torch.full((10,), 5))
