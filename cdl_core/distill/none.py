"""`none`: the student learns alone (cross-entropy only); the no-teacher baseline."""
from __future__ import annotations

import torch

from cdl_core.catalog.distill import NoKDParams
from cdl_core.distill.base import KDMethod, TaskClasses, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy


@register_kd_method
class NoDistillation(KDMethod):
    name = "none"
    Params = NoKDParams

    def loss(self, features, logits, teacher_logits, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        return current_task_cross_entropy(logits, targets, classes)
