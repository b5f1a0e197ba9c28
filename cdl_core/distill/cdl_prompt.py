"""`cdl_prompt`: CDL-Prompt as the v1 paper's text describes it — the teacher's prompts mapped into the student
by attention, a `kd_last` head on [CLS] distilled from the teacher's logits, prediction (1 - a) z_last + a z_kd
(distill.prediction="weighted", the official code's) or their mean.

Measured beside the official code (IRVLUTD/CDL at the paper's first commits): it never runs this mapping — the
teacher's prompts are computed and discarded, and the student trains a learnable KD token instead (the KD-token
methods are `dcdl`/`deit`). This method is the paper's description, not what produced its v1 numbers."""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.backbones import Prefix
from cdl_core.catalog.distill import CDLPromptParams
from cdl_core.distill.base import KDContext, KDMethod, TaskClasses, register_kd_method
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
        self.kd_head = nn.Linear(ctx.student_dim, ctx.n_classes)

    def extra_prefixes(self, teacher_prompt_queries: dict[int, torch.Tensor]) -> dict[int, Prefix]:
        return self.mapping(teacher_prompt_queries)

    def predict(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        share = self.cfg.alpha if self.cfg.prediction == "weighted" else 0.5
        return (1 - share) * logits + share * self.kd_head(features)

    def loss(self, features, logits, teacher_logits, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        kd_logits = self.kd_head(features)
        soft = logit_kd(kd_logits[:, current], teacher_logits[:, current], self.cfg.temperature)
        return (1 - a) * current_task_cross_entropy(logits, targets, classes) + a * soft
