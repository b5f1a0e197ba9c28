"""`dkd`: decoupled knowledge distillation (target / non-target terms) on the student's head."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cdl_core.config import ConfigError
from cdl_core.distill.base import KDMethod, TaskClasses, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy, decoupled_kd


@register_kd_method
class DecoupledKD(KDMethod):
    name = "dkd"

    @dataclass(frozen=True)
    class Params:
        target_weight: float = 1.0  # DKD's alpha (TCKD); official CDL code: 1
        non_target_weight: float = 4.0  # DKD's beta (NCKD); official CDL code: 4

    @classmethod
    def check_params(cls, params: "DecoupledKD.Params") -> None:
        if params.target_weight < 0 or params.non_target_weight < 0:
            raise ConfigError("distill.params target_weight and non_target_weight must be >= 0")

    def loss(self, features, logits, teacher_logits, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        soft = decoupled_kd(
            logits[:, current], teacher_logits[:, current], targets - classes.past,
            self.params.target_weight, self.params.non_target_weight, self.cfg.temperature,
        )
        return (1 - a) * current_task_cross_entropy(logits, targets, classes) + a * soft
