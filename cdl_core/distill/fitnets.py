"""`fitnets`: FitNets hints plus logit KD, as the official code computes it — the student's last block output
tokens (before the final norm, every token) mapped by a Linear D_s -> D_t and matched to the teacher's last block
output by mean squared error: loss = `kd`'s loss + feature_weight * MSE(W s_L, t_L). W is training-only; the
student predicts with its own head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.catalog.distill import FitNetsParams
from cdl_core.config import DistillConfig
from cdl_core.distill.base import KDContext, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.kd import LogitKD


@register_kd_method
class FitNets(LogitKD):
    name = "fitnets"
    Params = FitNetsParams

    def __init__(self, cfg: DistillConfig, params: FitNetsParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        self.regressor = nn.Linear(ctx.student_dim, ctx.teacher_dim)

    @property
    def teacher_taps(self) -> frozenset[int]:
        return frozenset({self.ctx.teacher_depth - 1})

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        # Tapping the last block makes it compute every token, which only the training loss needs.
        return Attachment(taps=frozenset({self.ctx.student_depth - 1})) if train else Attachment()

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        student = self.regressor(out.taps[self.ctx.student_depth - 1])
        hint = F.mse_loss(student, teacher.taps[self.ctx.teacher_depth - 1])
        return super().loss(out, teacher, targets, classes) + self.params.feature_weight * hint
