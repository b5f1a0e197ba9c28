"""`cdl_prompt`: CDL-Prompt — mapped teacher prompts in the student, a `kd_last` head distilled from the
teacher's logits, prediction = mean of `last` and `kd_last`."""
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
        return (logits + self.kd_head(features)) / 2

    def loss(self, features, logits, teacher_logits, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        a, current = self.cfg.alpha, slice(classes.past, classes.seen)
        kd_logits = self.kd_head(features)
        soft = logit_kd(kd_logits[:, current], teacher_logits[:, current], self.cfg.temperature)
        return (1 - a) * current_task_cross_entropy(logits, targets, classes) + a * soft
