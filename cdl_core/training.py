"""Training one role on one task: the loaders, the optimizer and schedule, and the step (its losses).

The teacher phase trains the teacher alone. The student phase trains the student from its frozen teacher's signal
(sequential schedule) or steps the teacher first on each batch and learns from its detached output (joint).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cdl_core.config import RunConfig
from cdl_core.data import TaskSplit
from cdl_core.data.draws import EpochImages, derive_seed, epoch_order
from cdl_core.distill import TaskClasses
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.errors import ConfigError
from cdl_core.frozen_inputs import FrozenInputs, FrozenPasses
from cdl_core.lr_schedules import build_lr_schedule
from cdl_core.signal_cache import StoredSignals
from cdl_core.model import ContinualModel


class PhaseTrainer:
    def __init__(self, cfg: RunConfig, frozen: FrozenPasses) -> None:
        self.cfg = cfg
        self.frozen = frozen
        self.device = frozen.device
        self.signals: StoredSignals | None = None  # a stored teacher's signals for its students (set by the run)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
            num_workers=self.cfg.train.num_workers, pin_memory=self.device.type == "cuda",
        )

    def epoch_loader(self, dataset: Dataset, t: int, epoch: int) -> DataLoader:
        """Epoch `epoch` of task `t`'s training images, batch by batch as (images, labels, positions): the same
        batches for the teacher and every student of this seed (see cdl_core.data.draws)."""
        tc = self.cfg.train
        return DataLoader(
            EpochImages(dataset, tc.seed, t, epoch), batch_size=tc.batch_size, sampler=epoch_order(len(dataset), tc.seed, t, epoch),
            drop_last=tc.drop_last, num_workers=tc.num_workers, pin_memory=self.device.type == "cuda",
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
        if tc.drop_last and len(task.train) < tc.batch_size:
            raise ConfigError(
                f"task {t + 1} has {len(task.train)} training images, fewer than train.batch_size={tc.batch_size}, and "
                "train.drop_last=true drops that one partial batch: nothing would train; lower the batch size or set train.drop_last=false"
            )
        learners = [frozen.teacher, frozen.student] if frozen.joint(role) else [frozen.teacher if role == "teacher" else frozen.student]
        optimizers = []
        for model in learners:
            model.prompt.begin_task(t)
            model.train()
            optimizers.append(self.optimizer(model))
        # Frozen outputs not computed step by step: a stored teacher's students read theirs from the store (computed
        # there by the first of them); without augmentation an image's are the same every epoch (computed once here).
        stored = self.signals.for_task(task, self.epoch_loader) if role == "student" and self.signals is not None else None
        cached = None
        if stored is None and not self.cfg.data.train_augment and tc.epochs > 1:
            batches = (images for images, _ in self.loader(task.train, tc.eval_batch_size, shuffle=False))
            cached = frozen.precompute(role, batches, t, len(task.train))
        for epoch in range(tc.epochs):
            for images, targets, positions in self.epoch_loader(task.train, t, epoch):
                images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
                positions = positions.to(self.device)
                inputs = stored.take(epoch, positions) if stored is not None else cached.take(positions) if cached is not None else None
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
