"""The one interface every distillation (KD) method implements, and its registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.catalog.distill import KDParams, resolve_kd_params
from cdl_core.config import DistillConfig
from cdl_core.errors import ConfigError


@dataclass(frozen=True)
class KDContext:
    """What a KD method may need to know to build its modules."""

    student_dim: int
    teacher_dim: int
    student_depth: int
    teacher_depth: int
    n_classes: int
    n_tasks: int
    prompt_method: str
    prompt_params: Any  # the resolved prompt-method params dataclass
    teacher_prompt_layers: tuple[int, ...]
    make_head: Callable[[int], nn.Module]  # a classifier of the model's kind (linear; cosine under APT) from a width


@dataclass(frozen=True)
class TaskClasses:
    """Stream labels [past, seen): the current task's classes; [0, past) belong to earlier tasks."""

    past: int
    seen: int


class TeacherSignal(NamedTuple):
    """What a student step takes from its teacher for a batch. Detached: nothing flows back into the teacher."""

    logits: torch.Tensor
    prompt_queries: dict[int, torch.Tensor] | None = None  # per-layer means of its prompts (prompt mapping)
    taps: dict[int, torch.Tensor] | None = None  # teacher block -> its output tokens (feature distillation)


class KDMethod(nn.Module):
    """Distillation from a frozen (or jointly trained) teacher into the student.

    The student's model calls `attachment` for what the method attaches to the student's backbone (prefixes,
    tokens, taps; `cdl_core.attach`), `predict` to turn its output into predictions, and `loss` for its training
    loss (without the prompt loss). `teacher_taps` names the teacher blocks whose outputs `loss` reads.
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

    @property
    def needs_teacher_at_eval(self) -> bool:
        """Whether predictions need the teacher (CDL-Prompt's mapping); the others evaluate with one student pass."""
        return self.params.needs_teacher_prompts

    @property
    def teacher_taps(self) -> frozenset[int]:
        return frozenset()

    def attachment(self, batch: int, train: bool, teacher: TeacherSignal | None) -> Attachment:
        return Attachment()

    def predict(self, out: ModelOutput) -> torch.Tensor:
        return out.logits

    def loss(self, out: ModelOutput, teacher: TeacherSignal | None, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
        raise NotImplementedError

    def kd_share(self) -> float:
        """A KD head's share of the prediction (distill.prediction): alpha when weighted, else a half."""
        return self.cfg.alpha if self.cfg.prediction == "weighted" else 0.5


KD_METHODS: dict[str, type[KDMethod]] = {}


def register_kd_method(cls: type[KDMethod]) -> type[KDMethod]:
    KD_METHODS[cls.name] = cls
    return cls


def build_kd_method(cfg: DistillConfig, ctx: KDContext) -> KDMethod:
    if cfg.method not in KD_METHODS:
        raise ConfigError(f"unknown distillation method {cfg.method!r}; valid: {', '.join(sorted(KD_METHODS))}")
    cls = KD_METHODS[cfg.method]
    return cls(cfg, cls.resolve_params(cfg.params), ctx)
