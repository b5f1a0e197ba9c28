"""`cdl_prompt`: CDL-Prompt as the v1 paper's text describes it — the teacher's prompts mapped into the student
by attention, a `kd_last` head on [CLS] distilled from the teacher's logits, prediction (1 - a) z_last + a z_kd
(distill.prediction="weighted", the official code's) or their mean.

Measured beside the official code (IRVLUTD/CDL at the paper's first commits): it never runs this mapping — the
teacher's prompts are computed and discarded, and the student trains a learnable KD token instead (the KD-token
methods are `dcdl`/`deit`). This method is the paper's description, not what produced its v1 numbers."""
from __future__ import annotations

import torch

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.catalog.distill import CDLPromptParams
from cdl_core.distill.base import KDContext, KDMethod, TaskClasses, TeacherSignal, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy, logit_kd
from cdl_core.distill.prompt_mapping import PromptMapping


@register_kd_method
class CDLPrompt(KDMethod):
    name = "cdl_prompt"
    Params = CDLPromptParams

    def __init__(self, cfg, params: CDLPromptParams, ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        params.check_against(ctx.prompt_params, ctx.n_tasks)
        self.resolved = params.resolved(ctx.prompt_params, ctx.n_tasks)
        self.mapping = PromptMapping(ctx.teacher_prompt_layers, ctx.teacher_dim, ctx.student_dim, 
                                     self.resolved["components"], self.resolved["length"], self.resolved["active_components"])
        self.kd_head = ctx.make_head(ctx.student_dim)

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        """The teacher's prompts mapped beside the student's own (the teacher is needed at evaluation too)."""
        return Attachment(self.mapping(teacher.prompt_queries))

    def predict(self, out: ModelOutput) -> torch.Tensor:
        share = self.kd_share()
        return (1 - share) * out.logits + share * self.kd_head(out.features)

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        kd_logits = self.kd_head(out.features)
        soft = logit_kd(kd_logits[:, current], teacher.logits[:, current], self.cfg.temperature)
        return (1 - a) * current_task_cross_entropy(out.logits, targets, classes) + a * soft
