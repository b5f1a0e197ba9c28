"""A stored teacher's frozen signals for its students, computed once per sweep and read by every student.

Every student of one stored teacher and seed trains on the same augmented batches (`cdl_core.data.draws`), so the
frozen passes of its steps compute the same thing in every trial: the student-size selection queries and the
teacher's logits. The first student to reach a task computes them for each epoch, batch by batch exactly as its
own steps would (so on the same device a student that reads them computes bit for bit what it would online), and
stores them beside the teacher as `signals_<t>_<variant>` (checksummed, committed like the teacher's tasks,
under the teacher's lease); the others wait on that lease and read them. Without augmentation every epoch draws the
same images, and one epoch's signals, from epoch 0's batches, serve them all.

Stored: the queries and the teacher's logits on the task's own classes (all that logit KD, DKD, the DeiT token and
D-CDL read; the other columns come back as NaN, so a method reading them would fail loudly). Computed online as
before: FitNets and ReviewKD (the teacher's block outputs), CDL-Prompt (the teacher's prompts), `query="own"`,
the joint schedule, runs without a teacher store, and a teacher whose signals would exceed
`train.signal_cache_max_gb` (`signal_cache_plan` says which and why, without torch).
"""
from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from cdl_core.config import RunConfig
from cdl_core.data import TaskSplit
from cdl_core.distill import TeacherSignal
from cdl_core.errors import TeacherStoreError
from cdl_core.frozen_inputs import FrozenInputs, FrozenPasses
from cdl_core.signal_plan import signal_cache_plan
from cdl_core.teacher_identity import content_key
from cdl_core.teacher_store import TeacherEntry

log = logging.getLogger(__name__)

EpochLoader = Callable[[Dataset, int, int], DataLoader]
SIGNAL_VERSION = 1  # bump when what is stored or how it is computed changes


class TaskSignals:
    """One task's stored signals: per epoch (one when every epoch draws the same images), the queries (None when
    the prompt method selects nothing) and the teacher's logits on the task's classes, row k for image k."""

    def __init__(self, queries: torch.Tensor | None, logits: torch.Tensor, past: int, n_classes: int) -> None:
        self.queries, self.logits, self.past, self.n_classes = queries, logits, past, n_classes

    def take(self, epoch: int, positions: torch.Tensor) -> FrozenInputs:
        e = epoch if len(self.logits) > 1 else 0
        rows = self.logits[e][positions]
        logits = rows.new_full((len(positions), self.n_classes), float("nan"))
        logits[:, self.past : self.past + rows.shape[1]] = rows
        query = self.queries[e][positions] if self.queries is not None else None
        return FrozenInputs(query, None, TeacherSignal(logits))

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.queries, self.logits) if x is not None)


class StoredSignals:
    """A sequential student's signals task by task: loaded from its teacher's store entry, or computed (under the
    lease `lock(name)`) and stored there."""

    def __init__(
        self, cfg: RunConfig, entry: TeacherEntry, lock: Callable[[str], AbstractContextManager], frozen: FrozenPasses,
        n_classes: int, device: torch.device,
    ) -> None:
        self.entry, self.lock, self.frozen = entry, lock, frozen
        self.n_classes, self.device = n_classes, device
        self.epochs = cfg.train.epochs if cfg.data.train_augment else 1
        # Where the numbers could differ although the teacher is the same: the device's kernels and, for APT, which
        # merged prompts the frozen teacher uses.
        self.variant = content_key({"version": SIGNAL_VERSION, "device": device.type, "merged": cfg.distill.teacher_merged_prompts})[:12]
        self.computed: list[int] = []  # tasks whose signals this run computed (the others it read)

    def stem(self, t: int) -> str:
        return f"signals_{t}_{self.variant}"

    def for_task(self, task: TaskSplit, epoch_loader: EpochLoader) -> TaskSignals:
        """`epoch_loader(dataset, t, epoch)`: the batches the student's steps will see (the trainer's)."""
        t = task.task_id
        stored = self.load(task)
        if stored is not None:
            return stored
        with self.lock(f"{self.entry.key}/{self.stem(t)}"):
            stored = self.load(task)  # another student may have stored them while this one waited
            if stored is not None:
                return stored
            signals = self.compute(task, epoch_loader)
            self.entry.save_file(self.stem(t), {"queries": signals.queries, "logits": signals.logits},
                                 {"task_id": t, "epochs": self.epochs, "images": len(task.train)})
        self.computed.append(t)
        log.info("task %d's frozen signals computed and stored with %s (%.1f MB)", t + 1, self.entry, signals.nbytes() / 2**20)
        return signals

    def load(self, task: TaskSplit) -> TaskSignals | None:
        if not self.entry.has_file(self.stem(task.task_id)):
            return None
        try:
            tensors, _ = self.entry.load_file(self.stem(task.task_id))
        except TeacherStoreError as err:
            log.warning("%s; computing them again", err)
            return None
        queries = tensors["queries"].to(self.device) if tensors["queries"] is not None else None
        return TaskSignals(queries, tensors["logits"].to(self.device), task.classes[0], self.n_classes)

    def compute(self, task: TaskSplit, epoch_loader: EpochLoader) -> TaskSignals:
        """Each epoch's batches, as the student's steps will see them, through the frozen passes."""
        t, past, width = task.task_id, task.classes[0], len(task.classes)
        n = len(task.train)
        queries, logits = None, torch.full((self.epochs, n, width), float("nan"), device=self.device)
        for epoch in range(self.epochs):
            for images, _, positions in epoch_loader(task.train, t, epoch):
                inputs = self.frozen.inputs("student", images.to(self.device, non_blocking=True), t)
                positions = positions.to(self.device)
                logits[epoch, positions] = inputs.teacher.logits[:, past : past + width]
                if inputs.query is not None:
                    if queries is None:
                        queries = torch.full((self.epochs, n, inputs.query.shape[1]), float("nan"), device=self.device)
                    queries[epoch, positions] = inputs.query
        return TaskSignals(queries, logits, past, self.n_classes)


def stored_signals(
    cfg: RunConfig, entry: TeacherEntry, lock: Callable[[str], AbstractContextManager], frozen: FrozenPasses,
    n_classes: int, n_train_images: int, device: torch.device,
) -> StoredSignals | None:
    """The run's signal cache, or None (said once, with the reason) when its students compute their signals online."""
    plan = signal_cache_plan(cfg, n_train_images)
    if plan.online_because:
        log.info("frozen signals computed online in every step: %s", plan.online_because)
        return None
    return StoredSignals(cfg, entry, lock, frozen, n_classes, device)
