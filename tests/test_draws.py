"""The training stream's draws are pure functions: image k of a task's epoch is the same whatever the data workers,
the batch it lands in or the role trained; an epoch's order depends on (seed, task, epoch) alone."""
import numpy as np
import pytest
import torch

from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.data.base import StreamDataset, TensorImages
from cdl_core.data.draws import EpochImages, epoch_order
from cdl_core.data.transforms import build_train_transform
from cdl_core.learner import ContinualRun
from cdl_core.training import PhaseTrainer


def augmented_task(n: int = 24) -> StreamDataset:
    images = torch.randint(0, 256, (n, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = build_train_transform(16, None, crop_scale_min=0.08)
    return StreamDataset(TensorImages(images), np.arange(n), np.arange(n) % 4, transform)


def drawn(dataset, seed, task, epoch, batch_size, workers, order=None):
    """{image index: augmented image} as a DataLoader of `workers` processes delivers them."""
    loader = torch.utils.data.DataLoader(EpochImages(dataset, seed, task, epoch), batch_size=batch_size,
                                         sampler=order or list(range(len(dataset))), num_workers=workers)
    return {int(k): image for images, _, positions in loader for k, image in zip(positions, images)}


def test_an_augmented_image_depends_on_seed_task_epoch_and_index_only():
    dataset = augmented_task()
    reference = drawn(dataset, seed=3, task=1, epoch=2, batch_size=1, workers=0)
    # other worker counts, batch sizes and orders: the same image for every index
    for batch_size, workers, order in ((5, 2, None), (8, 0, list(reversed(range(len(dataset))))), (24, 1, epoch_order(24, 0, 0, 0))):
        other = drawn(dataset, 3, 1, 2, batch_size, workers, order)
        assert other.keys() == reference.keys()
        assert all(torch.equal(other[k], reference[k]) for k in reference), (batch_size, workers)
    # it is augmented: another epoch, task or seed draws other crops
    for seed, task, epoch in ((3, 1, 3), (3, 0, 2), (4, 1, 2)):
        other = drawn(dataset, seed, task, epoch, 6, 0)
        assert sum(not torch.equal(other[k], reference[k]) for k in reference) > len(reference) // 2


def test_drawing_leaves_the_callers_rng_as_it_was():
    dataset = EpochImages(augmented_task(), 0, 0, 0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    dataset[0], dataset[5]
    assert torch.equal(torch.rand(3), expected)


def test_an_epochs_order_is_a_permutation_drawn_from_seed_task_and_epoch():
    order = epoch_order(50, seed=1, task=2, epoch=3)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, 1, 2, 3)
    assert all(order != epoch_order(50, *other) for other in ((2, 2, 3), (1, 3, 3), (1, 2, 4)))


def tiny_cfg(workers: int) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=2, train_per_class=3, test_per_class=1, val_fraction=0.0),
        student=BackboneConfig("demo-s", "random"), teacher=BackboneConfig("demo-t", "random"),
        prompt=PromptConfig("coda"), distill=DistillConfig("kd"),
        train=TrainConfig(epochs=2, batch_size=4, eval_batch_size=16, device="cpu", num_workers=workers, drop_last=False),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_the_teacher_and_its_student_train_on_the_same_batches(monkeypatch, workers):
    seen: dict[str, list] = {"teacher": [], "student": []}
    step = PhaseTrainer.step

    def recording(self, role, images, targets, t, *args, **kwargs):
        seen[role].append((t, images.clone(), targets.clone()))
        return step(self, role, images, targets, t, *args, **kwargs)

    monkeypatch.setattr(PhaseTrainer, "step", recording)
    ContinualRun(tiny_cfg(workers)).run()
    assert len(seen["teacher"]) == len(seen["student"]) == 2 * 2 * 4  # tasks x epochs x ceil(15 / 4) batches
    for (t1, x1, y1), (t2, x2, y2) in zip(seen["teacher"], seen["student"]):
        assert t1 == t2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    recorded = {workers: [x for _, x, _ in seen["student"]]}
    if workers:  # the same batches as in-process loading draws
        seen = {"teacher": [], "student": []}
        ContinualRun(tiny_cfg(0)).run()
        assert all(torch.equal(a, b) for a, b in zip(recorded[workers], [x for _, x, _ in seen["student"]]))
