"""The one interface every distillation (KD) method implements, and its registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cdl_core.backbones import Prefix
from cdl_core.catalog.distill import KDParams, resolve_kd_params
from cdl_core.config import DistillConfig
from cdl_core.errors import ConfigError


@dataclass(frozen=True)
class KDContext:
    """What a KD method may need to know to build its modules."""

    student_dim: int
    teacher_dim: int
    n_classes: int
    n_tasks: int
    prompt_method: str
    prompt_params: Any  # the resolved prompt-method params dataclass
    teacher_prompt_layers: tuple[int, ...]


@dataclass(frozen=True)
class TaskClasses:
    """Stream labels [past, seen): the current task's classes; [0, past) belong to earlier tasks."""

    past: int
    seen: int


class KDMethod(nn.Module):
    """Distillation from a frozen (or jointly trained) teacher into the student.

    The student calls `extra_prefixes` to get prompts derived from the teacher's (given as their per-layer
    `teacher_prompt_queries`, which is all a mapping needs and what a step can cache), `predict` to turn its
    features/head logits into predictions, and `loss` for its training loss (without the prompt loss).
    """

    name: ClassVar[str]
    Params: ClassVar[type[KDParams]]  # the method's parameters (cdl_core.catalog.distill)

    def __init__(self, cfg: DistillConfig, params: KDParams, ctx: KDContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.params = params
        self.ctx = ctx

    @classmethod
    def resolve_params(cls, overrides: dict[str, Any]) -> KDParams:
        return resolve_kd_params(cls.name, overrides)

    def extra_prefixes(self, teacher_prompt_queries: dict[int, torch.Tensor]) -> dict[int, Prefix]:
        return {}

    def predict(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def loss(
        self, features: torch.Tensor, logits: torch.Tensor, teacher_logits: torch.Tensor | None,
        targets: torch.Tensor, classes: TaskClasses,
    ) -> torch.Tensor:
        raise NotImplementedError


KD_METHODS: dict[str, type[KDMethod]] = {}


def register_kd_method(cls: type[KDMethod]) -> type[KDMethod]:
    KD_METHODS[cls.name] = cls
    return cls


def build_kd_method(cfg: DistillConfig, ctx: KDContext) -> KDMethod:
    if cfg.method not in KD_METHODS:
        raise ConfigError(f"unknown distillation method {cfg.method!r}; valid: {', '.join(sorted(KD_METHODS))}")
    cls = KD_METHODS[cfg.method]
    return cls(cfg, cls.resolve_params(cfg.params), ctx)
