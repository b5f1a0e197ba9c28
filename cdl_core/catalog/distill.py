"""The distillation methods' parameters and what each needs, and the checks a config alone decides. The
modules are in cdl_core.distill."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from cdl_core.catalog.params import resolve_method_params
from cdl_core.catalog.prompts import PromptParams
from cdl_core.errors import ConfigError

SECTION = "distill.params"


class KDParams:
    """Base of each method's frozen Params dataclass."""

    method: ClassVar[str]
    needs_teacher_prompts: ClassVar[bool] = False  # maps the teacher's prompts (a prompt method must make some)
    default_temperature: ClassVar[float] = 2.0  # distill.temperature when it is not set

    def check(self) -> None:
        """What the parameters alone decide; raise ConfigError."""

    def check_against(self, prompt: PromptParams, n_tasks: int) -> None:
        """What the prompt method and the task count decide; raise ConfigError."""


@dataclass(frozen=True)
class NoKDParams(KDParams):
    method: ClassVar[str] = "none"


@dataclass(frozen=True)
class LogitKDParams(KDParams):
    method: ClassVar[str] = "kd"


@dataclass(frozen=True)
class DKDParams(KDParams):
    method: ClassVar[str] = "dkd"
    default_temperature: ClassVar[float] = 4.0  # the official code's DKD has its own fixed T = 4 (it ignores Soft_T)
    target_weight: float = 1.0  # DKD's alpha (TCKD); official CDL code: 1
    non_target_weight: float = 4.0  # DKD's beta (NCKD); official CDL code: 4


@dataclass(frozen=True)
class CDLPromptParams(KDParams):
    method: ClassVar[str] = "cdl_prompt"
    needs_teacher_prompts: ClassVar[bool] = True
    components: int | None = None  # M; None: the prompt method's pool size (CODA 100, L2P 30, DualPrompt 10)
    length: int | None = None  # L_m; None: the prompt method's prompt length (CODA 8, L2P 20, DualPrompt 20)
    # Components actually used. None: M // n_tasks, what the official code uses (its task counter never
    # advances past the first task's slice).
    active_components: int | None = None

    def check(self) -> None:
        for name in ("components", "length", "active_components"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{SECTION}.{name}={value} must be at least 1")
        if self.length is not None and self.length % 2:
            raise ConfigError(f"{SECTION}.length={self.length} must be even (key + value halves)")

    def resolved(self, prompt: PromptParams, n_tasks: int) -> dict[str, int]:
        """M, L_m and the active components, defaults taken from the prompt method."""
        components = self.components or getattr(prompt, "pool_size")
        length = self.length or getattr(prompt, "length")
        return {"components": components, "length": length, "active_components": self.active_components or max(1, components // n_tasks)}

    def check_against(self, prompt: PromptParams, n_tasks: int) -> None:
        if not prompt.prompted_layers:
            raise ConfigError(f"distill.method={self.method!r} maps the teacher's prompts, but prompt.method={prompt.method!r} "
                              "has none; choose l2p, dualprompt or coda")
        sizes = self.resolved(prompt, n_tasks)
        if sizes["active_components"] > sizes["components"]:
            raise ConfigError(f"{SECTION}.active_components={sizes['active_components']} exceeds components={sizes['components']}")


KD_PARAMS: dict[str, type[KDParams]] = {cls.method: cls for cls in (NoKDParams, LogitKDParams, DKDParams, CDLPromptParams)}


def resolve_kd_params(method: str, overrides: dict[str, Any]) -> KDParams:
    return resolve_method_params(KD_PARAMS, "distillation method", SECTION, method, overrides)
