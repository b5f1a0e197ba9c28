"""Training one role on one task: the loaders, the optimizer and schedule, and the step (its losses).

The teacher phase trains the teacher alone. The student phase trains the student from its frozen teacher's signal
(sequential schedule) or steps the teacher first on each batch and learns from its detached output (joint).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cdl_core.config import RunConfig
from cdl_core.data import TaskSplit
from cdl_core.distill import TaskClasses
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.errors import ConfigError
from cdl_core.frozen_inputs import FrozenInputs, FrozenPasses
from cdl_core.lr_schedules import build_lr_schedule
from cdl_core.model import ContinualModel


def derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class IndexedDataset(Dataset):
    """(image, label, position) items, so a batch can be matched with precomputed per-image values."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        return (*self.dataset[index], index)


class PhaseTrainer:
    def __init__(self, cfg: RunConfig, frozen: FrozenPasses) -> None:
        self.cfg = cfg
        self.frozen = frozen
        self.device = frozen.device

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
            num_workers=self.cfg.train.num_workers, pin_memory=self.device.type == "cuda",
        )

    def optimizer(self, model: ContinualModel) -> tuple[torch.optim.Optimizer, Any]:
        tc = self.cfg.train
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        return optimizer, build_lr_schedule(optimizer, tc.lr_schedule, tc.epochs)

    def train_phase(self, role: str, task: TaskSplit) -> None:
        """Train `role` on one task; in the joint schedule the student phase steps the teacher too."""
        t, tc, frozen = task.task_id, self.cfg.train, self.frozen
        torch.manual_seed(derive_seed(tc.seed, role, t))
        classes = TaskClasses(past=task.classes[0], seen=task.classes[-1] + 1)
        learners = [frozen.teacher, frozen.student] if frozen.joint(role) else [frozen.teacher if role == "teacher" else frozen.student]
        optimizers = []
        for model in learners:
            model.prompt.begin_task(t)
            model.train()
            optimizers.append(self.optimizer(model))
        # Without augmentation an image's frozen outputs are the same every epoch: compute them once.
        cached = None
        if not self.cfg.data.train_augment and tc.epochs > 1:
            batches = (images for images, _ in self.loader(task.train, tc.eval_batch_size, shuffle=False))
            cached = frozen.precompute(role, batches, t, len(task.train))
        dataset = IndexedDataset(task.train) if cached is not None else task.train
        if tc.drop_last and len(dataset) < tc.batch_size:
            raise ConfigError(
                f"task {t + 1} has {len(dataset)} training images, fewer than train.batch_size={tc.batch_size}, and "
                "train.drop_last=true drops that one partial batch: nothing would train; lower the batch size or set train.drop_last=false"
            )
        loader = self.loader(dataset, tc.batch_size, shuffle=True, seed=derive_seed(tc.seed, role, t, "loader"), drop_last=tc.drop_last)
        for _ in range(tc.epochs):
            for batch in loader:
                images, targets = (x.to(self.device, non_blocking=True) for x in batch[:2])
                inputs = cached.take(batch[2].to(self.device)) if cached is not None else None
                self.step(role, images, targets, t, classes, [opt for opt, _ in optimizers], inputs)
            for _, scheduler in optimizers:
                if scheduler is not None:
                    scheduler.step()
        for model in learners:
            model.prompt.end_task(t)
            model.eval()

    def step(
        self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
        optimizers: list[torch.optim.Optimizer], inputs: FrozenInputs | None = None,
    ) -> list[torch.Tensor]:
        """One optimisation step of `role` on a batch (the joint schedule's student step updates its teacher
        first): `optimizers` in the order of the returned losses (teacher's, then student's)."""
        losses = self.losses(role, images, targets, t, classes, inputs)
        for optimizer, loss in zip(optimizers, losses):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return losses

    def losses(
        self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
        inputs: FrozenInputs | None = None,
    ) -> list[torch.Tensor]:
        """The training losses of a batch: [teacher's] for the teacher phase, [teacher's, student's] for a joint
        student step, else [student's]. `inputs`: the batch's precomputed frozen outputs (computed when None)."""
        frozen = self.frozen
        if inputs is None:
            inputs = frozen.inputs(role, images, t)
        with frozen.autocast():
            if role == "teacher":
                return [self._teacher_loss(images, targets, t, classes, inputs.query)[0]]
            losses, teacher, kd = [], inputs.teacher, frozen.student.kd
            if frozen.joint(role):  # the teacher steps on this batch first; the student learns from its (detached) output
                taps = kd.teacher_taps if kd is not None else frozenset()
                teacher_loss, teacher_out = self._teacher_loss(images, targets, t, classes, inputs.teacher_query, taps)
                losses.append(teacher_loss)
                teacher = frozen.signal(teacher_out, len(images), taps)
            out = frozen.student(images, inputs.query, t, train=True, teacher=teacher)
            loss = current_task_cross_entropy(out.logits, targets, classes) if kd is None else kd.loss(out, teacher, targets, classes)
            losses.append(loss + out.prompt_loss)
        return losses

    def _teacher_loss(self, images, targets, t: int, classes: TaskClasses, query, taps: frozenset[int] = frozenset()):
        out = self.frozen.teacher(images, query, t, train=True, taps=taps)
        return current_task_cross_entropy(out.logits, targets, classes) + out.prompt_loss, out
