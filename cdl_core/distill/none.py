"""`none`: the student learns alone (cross-entropy only); the no-teacher baseline."""
from __future__ import annotations

import torch

from cdl_core.attach import ModelOutput
from cdl_core.catalog.distill import NoKDParams
from cdl_core.distill.base import KDMethod, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy


@register_kd_method
class NoDistillation(KDMethod):
    name = "none"
    Params = NoKDParams

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        return current_task_cross_entropy(out.logits, targets, classes)
