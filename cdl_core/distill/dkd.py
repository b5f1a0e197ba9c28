"""`dkd`: decoupled knowledge distillation (target / non-target terms) on the student's head."""
from __future__ import annotations

import torch

from cdl_core.attach import ModelOutput
from cdl_core.catalog.distill import DKDParams
from cdl_core.distill.base import KDMethod, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy, decoupled_kd


@register_kd_method
class DecoupledKD(KDMethod):
    name = "dkd"
    Params = DKDParams

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        soft = decoupled_kd(
            out.logits[:, current], teacher.logits[:, current], targets - classes.past,
            self.params.target_weight, self.params.non_target_weight, self.cfg.temperature,
        )
        return (1 - a) * current_task_cross_entropy(out.logits, targets, classes) + a * soft
