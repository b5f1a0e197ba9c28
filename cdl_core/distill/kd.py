"""`kd`: Hinton logit distillation on the student's own head, no prompt mapping."""
from __future__ import annotations

import torch

from cdl_core.attach import ModelOutput
from cdl_core.catalog.distill import LogitKDParams
from cdl_core.distill.base import KDMethod, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy, logit_kd


@register_kd_method
class LogitKD(KDMethod):
    name = "kd"
    Params = LogitKDParams

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        soft = logit_kd(out.logits[:, current], teacher.logits[:, current], self.cfg.temperature)
        return (1 - a) * current_task_cross_entropy(out.logits, targets, classes) + a * soft
