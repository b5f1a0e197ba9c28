"""`cdl_prompt`: CDL-Prompt — mapped teacher prompts in the student, a `kd_last` head distilled from the
teacher's logits, prediction = mean of `last` and `kd_last`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cdl_core.backbones import Prefix
from cdl_core.config import ConfigError
from cdl_core.distill.base import KDContext, KDMethod, TaskClasses, register_kd_method
from cdl_core.distill.losses import current_task_cross_entropy, logit_kd
from cdl_core.distill.prompt_mapping import PromptMapping


@register_kd_method
class CDLPrompt(KDMethod):
    name = "cdl_prompt"
    needs_teacher_prompts = True

    @dataclass(frozen=True)
    class Params:
        components: int | None = None  # M; None: the prompt method's pool size (CODA 100, L2P 30, DualPrompt 10)
        length: int | None = None  # L_m; None: the prompt method's prompt length (CODA 8, L2P 20, DualPrompt 20)
        # Components actually used. None: M // n_tasks, what the official code uses (its task counter never
        # advances past the first task's slice).
        active_components: int | None = None

    @classmethod
    def check_params(cls, params: "CDLPrompt.Params") -> None:
        for name in ("components", "length", "active_components"):
            value = getattr(params, name)
            if value is not None and value < 1:
                raise ConfigError(f"distill.params.{name}={value} must be at least 1")
        if params.length is not None and params.length % 2:
            raise ConfigError(f"distill.params.length={params.length} must be even (key + value halves)")

    def __init__(self, cfg, params: "CDLPrompt.Params", ctx: KDContext) -> None:
        super().__init__(cfg, params, ctx)
        components = params.components or ctx.prompt_params.pool_size
        length = params.length or ctx.prompt_params.length
        active = params.active_components or max(1, components // ctx.n_tasks)
        if active > components:
            raise ConfigError(f"distill.params.active_components={active} exceeds components={components}")
        self.resolved = {"components": components, "length": length, "active_components": active}
        self.mapping = PromptMapping(ctx.teacher_prompt_layers, ctx.teacher_dim, ctx.student_dim, components, length, active)
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
