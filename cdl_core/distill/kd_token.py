"""What `dcdl` and `deit` share, as the official code computes it: a learnable KD token in the student's sequence,
read by a `kd_last` head; loss (1 - a) CE(z_cls, past classes masked) + a KL_T(z_kd, t) over the current task's
logits, prediction (1 - a) z_cls + a z_kd. The official code appends D-CDL's token at the end of the sequence and
puts the v2 DeiT token before [CLS]; without a position embedding on it, attention is permutation-equivariant, so
where it sits changes no output."""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.catalog.distill import KDParams
from cdl_core.config import DistillConfig
from cdl_core.distill.base import KDContext, KDMethod, TaskClasses, TeacherSignal
from cdl_core.distill.losses import current_task_cross_entropy, logit_kd


class KDTokenMethod(KDMethod):
    """Base of the KD-token methods: a subclass sets `self.token` (1, 1, D_s) and may add prefixes."""

    token: nn.Parameter

    def __init__(self, cfg: DistillConfig, params: KDParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        self.kd_head = ctx.make_head(ctx.student_dim)  # cosine under APT, like the main head

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        # In training and evaluation alike: the token is part of the student's model, no teacher needed.
        return Attachment(tokens=self.token)

    def kd_logits(self, out: ModelOutput) -> torch.Tensor:
        # The model merges the KD method's attachment after the prompt method's, so its token is the last one.
        return self.kd_head(out.tokens[:, -1])

    def predict(self, out: ModelOutput) -> torch.Tensor:
        share = self.kd_share()
        return (1 - share) * out.logits + share * self.kd_logits(out)

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        soft = logit_kd(self.kd_logits(out)[:, current], teacher.logits[:, current], self.cfg.temperature)
        return (1 - a) * current_task_cross_entropy(out.logits, targets, classes) + a * soft
