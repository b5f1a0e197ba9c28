"""Evaluation after each task: accuracy on every seen task's test (and validation) images, over all seen classes."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from cdl_core.data import ClassIncrementalStream
from cdl_core.frozen_inputs import FrozenPasses


class Evaluator:
    def __init__(self, stream: ClassIncrementalStream, frozen: FrozenPasses, loader: Callable[[Dataset], DataLoader]) -> None:
        self.stream = stream
        self.frozen = frozen
        self.loader = loader  # an unshuffled evaluation loader over a dataset
        # Each evaluation split's selection queries, batch by batch: a frozen backbone on unaugmented images gives the
        # same ones at every later evaluation of that split (a task's test images are evaluated after every later task).
        self._queries: dict[int, list[tuple[torch.Tensor | None, torch.Tensor | None]]] = {}

    def splits(self, role: str, t: int) -> dict[str, list[float]]:
        """Row t of `role`'s accuracy matrices: test, and val when every seen task has a validation split."""
        tasks = self.stream.tasks[: t + 1]
        splits = {"test": [task.test for task in tasks]}
        if all(len(task.val) for task in tasks):
            splits["val"] = [task.val for task in tasks]
        return {name: [self.accuracy(role, ds, t) for ds in datasets] for name, datasets in splits.items()}

    @torch.inference_mode()
    def accuracy(self, role: str, dataset: Dataset, t: int) -> float:
        """Accuracy (%) of `role` after task t on `dataset`, predicting among all classes seen so far. A student
        costs one pass of its own (and the query pass); only a KD method that maps the teacher's prompts
        (CDL-Prompt) calls the teacher too."""
        frozen, seen = self.frozen, self.stream.tasks[t].classes[-1] + 1
        model = frozen.teacher if role == "teacher" else frozen.student
        needs_teacher = role == "student" and model.kd is not None and model.kd.needs_teacher_at_eval
        correct = total = 0
        queries = self._queries.get(id(dataset))
        first = queries is None
        if first:
            queries = []
        for batch, (images, targets) in enumerate(self.loader(dataset)):
            images, targets = images.to(frozen.device), targets.to(frozen.device)
            if first:
                queries.append(frozen.queries(images))
            student_q, teacher_q = queries[batch]
            teacher = frozen.teacher_signal(images, teacher_q, t, merged="current", train=False) if needs_teacher else None
            with frozen.autocast():
                query = teacher_q if role == "teacher" else student_q
                logits = model.predict(model(images, query, t, train=False, teacher=teacher))
            correct += (logits[:, :seen].argmax(dim=1) == targets).sum().item()
            total += len(targets)
        if first:
            self._queries[id(dataset)] = queries
        return 100.0 * correct / max(total, 1)
