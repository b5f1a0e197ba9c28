"""ImageNet-R with the official split lists (data.split_files): ids from the lists, the run record, the errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cdl_core.config import DataConfig
from cdl_core.data import build_stream
from cdl_core.errors import SplitFileError

N_CLASSES, PER_CLASS, N_TASKS = 200, 5, 10
WNIDS = [f"n{c:08d}" for c in range(N_CLASSES)]  # on disk; sorted order = our split's class ids
# the lists' class ids: a fixed permutation of the sorted-wnid order, so a test passing proves ids come from the file
OFFICIAL_ID = dict(zip(WNIDS, (int(i) for i in np.random.default_rng(7).permutation(N_CLASSES))))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-R's layout with tiny images (the stream insists on all 200 classes); read-only for the tests."""
    base = tmp_path_factory.mktemp("imagenet_r")
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        folder = base / "imagenet-r" / wnid
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).save(folder / f"art_{i}.jpg")
    return base


def official_entries() -> dict[str, list[tuple[str, int]]]:
    """(listed path, class id) per part: 3 train / 2 test images per class, in a shuffled global order."""
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for wnid in WNIDS:
        for i in range(PER_CLASS):
            parts["train" if i < 3 else "test"].append((f"data/imagenet-r/{wnid}/art_{i}.jpg", OFFICIAL_ID[wnid]))
    rng = np.random.default_rng(3)
    return {part: [entries[k] for k in rng.permutation(len(entries))] for part, entries in parts.items()}


def write_lists(folder: Path, parts: dict[str, list[tuple[str, int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for part, entries in parts.items():
        content = {"data": [p for p, _ in entries], "targets": [t for _, t in entries]}
        (folder / f"imagenet-r_{part}.yaml").write_text(yaml.safe_dump(content))
    return folder


def stream_of(root: Path, split_files: Path | None):
    cfg = DataConfig(
        name="imagenet_r", root=str(root), split_files=None if split_files is None else str(split_files),
        n_tasks=N_TASKS, val_fraction=0.0,
    )
    return build_stream(cfg, image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(path: str) -> str:
    """A listed path as `<wnid>/<file>`, to compare with the stream's image paths."""
    return "/".join(Path(path).parts[-2:])


def test_official_lists_give_labels_tasks_class_names_and_record(root, tmp_path):
    parts = official_entries()
    lists = write_lists(tmp_path / "splits", parts)
    own_split = root / "imagenet-r-split-seed0.json"
    own_split_existed = own_split.exists()  # the module's other tests may have made it already
    stream = stream_of(root, lists)

    # class order "sorted": stream label == the lists' target, whatever the wnids' sorted order is
    assert stream.class_order == tuple(range(N_CLASSES))
    assert stream.class_names == tuple(sorted(WNIDS, key=OFFICIAL_ID.get))
    for part, attr in (("train", "train"), ("test", "test")):
        target_of = {listed(p): t for p, t in parts[part]}
        seen = []
        for task in stream.tasks:
            dataset = getattr(task, attr)
            for index, label in zip(dataset.indices, dataset.labels):
                image = listed(str(dataset.images.paths[index]))
                assert target_of[image] == label
                seen.append(image)
        assert sorted(seen) == sorted(target_of)  # every listed image once, nothing else

    task0 = stream.tasks[0]
    first_ids = range(N_CLASSES // N_TASKS)
    assert task0.classes == tuple(first_ids)
    expect_train = {listed(p) for p, t in parts["train"] if t in first_ids}
    expect_test = {listed(p) for p, t in parts["test"] if t in first_ids}
    assert {listed(str(task0.train.images.paths[i])) for i in task0.train.indices} == expect_train
    assert {listed(str(task0.test.images.paths[i])) for i in task0.test.indices} == expect_test
    assert (len(expect_train), len(expect_test), len(task0.val)) == (60, 40, 0)

    record = stream.describe()
    assert json.loads(json.dumps(record)) == record
    assert record["split"] == "official"
    assert record["split_files_sha256"] == {
        "train": sha256(lists / "imagenet-r_train.yaml"), "test": sha256(lists / "imagenet-r_test.yaml"),
    }
    assert own_split.exists() == own_split_existed  # the official lists neither make nor need our split


def test_official_and_own_split_differ_in_record_and_fingerprint(root, tmp_path):
    ours = stream_of(root, None)
    assert ours.describe()["split"] == "ours" and ours.describe()["split_seed"] == 0

    # official lists that reproduce our split exactly (same ids, same order): equal indices, yet another split
    own = json.loads((root / "imagenet-r-split-seed0.json").read_text())
    same = {
        part: [(f"data/imagenet-r/{f}", WNIDS.index(f.split("/")[0])) for f in own[part]] for part in ("train", "test")
    }
    official = stream_of(root, write_lists(tmp_path / "same", same))
    for a, b in zip(ours.tasks, official.tasks):
        assert np.array_equal(a.train.indices, b.train.indices) and np.array_equal(a.test.indices, b.test.indices)
    assert official.fingerprint() != ours.fingerprint()

    shuffled_ids = stream_of(root, write_lists(tmp_path / "permuted", official_entries()))
    assert len({ours.fingerprint(), official.fingerprint(), shuffled_ids.fingerprint()}) == 3


def _error(root: Path, lists: Path) -> str:
    with pytest.raises(SplitFileError) as err:
        stream_of(root, lists)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_split_file_is_named(root, tmp_path):
    lists = write_lists(tmp_path / "splits", {"train": official_entries()["train"]})
    message = _error(root, lists)
    assert str(lists / "imagenet-r_test.yaml") in message and "CODA-Prompt" in message


def test_listed_image_missing_on_disk_is_named(root, tmp_path):
    parts = official_entries()
    parts["test"].append(("data/imagenet-r/n00000003/art_9.jpg", OFFICIAL_ID["n00000003"]))
    message = _error(root, write_lists(tmp_path / "splits", parts))
    assert str(root / "imagenet-r" / "n00000003" / "art_9.jpg") in message
    assert "imagenet-r_test.yaml" in message and "imagenet-r.tar" in message


def test_missing_class_folder_is_named(root, tmp_path):
    parts = {
        part: [(p.replace("n00000007", "n99999999"), t) for p, t in entries]
        for part, entries in official_entries().items()
    }
    message = _error(root, write_lists(tmp_path / "splits", parts))
    assert str(root / "imagenet-r" / "n99999999") in message and "missing" in message


def test_folder_with_two_class_ids_is_refused(root, tmp_path):
    parts = official_entries()
    parts["train"].append(("data/imagenet-r/n00000005/art_4.jpg", N_CLASSES))  # a second id for n00000005
    message = _error(root, write_lists(tmp_path / "splits", parts))
    assert "n00000005" in message and "two class ids" in message
    assert f"{OFFICIAL_ID['n00000005']} and {N_CLASSES}" in message


def test_class_id_with_two_folders_is_refused(root, tmp_path):
    parts = official_entries()
    path, target = parts["train"][-1]
    other = next(t for _, t in parts["train"] if t != target)
    parts["train"][-1] = (path, other)
    message = _error(root, write_lists(tmp_path / "splits", parts))
    assert f"class id {other} to two folders" in message and listed(path).split("/")[0] in message


def test_lists_of_unequal_length_are_refused(root, tmp_path):
    lists = write_lists(tmp_path / "splits", official_entries())
    train = lists / "imagenet-r_train.yaml"
    content = yaml.safe_load(train.read_text())
    content["targets"].pop()
    train.write_text(yaml.safe_dump(content))
    message = _error(root, lists)
    assert str(train) in message and f"{3 * N_CLASSES} images but {3 * N_CLASSES - 1} targets" in message
