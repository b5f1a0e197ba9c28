"""The distillation methods' parameters and what each needs, and the checks a config alone decides. The
modules are in cdl_core.distill."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from cdl_core.catalog.params import at_least_one, even_length, resolve_method_params
from cdl_core.catalog.presets import BackbonePreset
from cdl_core.catalog.prompts import PromptParams
from cdl_core.errors import ConfigError

SECTION = "distill.params"


class KDParams:
    """Base of each method's frozen Params dataclass."""

    method: ClassVar[str]
    needs_teacher_prompts: ClassVar[bool] = False  # maps the teacher's prompts (a prompt method must make some)
    reads_teacher_blocks: ClassVar[bool] = False  # compares with the outputs of some of the teacher's blocks
    default_temperature: ClassVar[float] = 2.0  # distill.temperature when it is not set

    def check(self) -> None:
        """What the parameters alone decide; raise ConfigError."""

    def check_against(self, prompt: PromptParams, n_tasks: int) -> None:
        """What the prompt method and the task count decide; raise ConfigError."""

    def check_backbones(self, student: BackbonePreset, teacher: BackbonePreset) -> None:
        """What the two backbones' shapes decide; raise ConfigError."""

    def in_effect(self, student_depth: int) -> "KDParams":
        """The parameters as they run on a student of `student_depth` blocks (a setting the depth caps, capped)."""
        return self


def _same_tokens(method: str, student: BackbonePreset, teacher: BackbonePreset) -> None:
    """Feature distillation compares block outputs token by token: both backbones need the same patch grid."""
    if student.tokens != teacher.tokens:
        raise ConfigError(f"distill.method={method!r} compares block outputs token by token, but the student {student.name} "
                          f"has {student.tokens} tokens and the teacher {teacher.name} {teacher.tokens}; pick presets with the "
                          "same image and patch size")


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
            at_least_one(SECTION, name, getattr(self, name))
        if self.length is not None and self.length % 2:
            raise ConfigError(f"{SECTION}.length={self.length} must be even (key + value halves)")

    def resolved(self, prompt: PromptParams, n_tasks: int) -> dict[str, int]:
        """M, L_m and the active components, defaults taken from the prompt method."""
        components = self.components or getattr(prompt, "pool_size")
        length = self.length or getattr(prompt, "length")
        return {"components": components, "length": length, "active_components": self.active_components or max(1, components // n_tasks)}

    def check_against(self, prompt: PromptParams, n_tasks: int) -> None:
        if not prompt.prompted_layers:
            raise ConfigError(f"distill.method={self.method!r} maps the teacher's prefix prompts, but prompt.method={prompt.method!r} "
                              "has none; choose l2p, dualprompt or coda")
        sizes = self.resolved(prompt, n_tasks)
        if sizes["active_components"] > sizes["components"]:
            raise ConfigError(f"{SECTION}.active_components={sizes['active_components']} exceeds components={sizes['components']}")


@dataclass(frozen=True)
class DCDLParams(KDParams):
    """D-CDL (decoupled prompting, KDP in arXiv v3): a KD token at layer 0 and KD prefixes at layers 1..layers-1."""

    method: ClassVar[str] = "dcdl"
    layers: int = 12  # KD prompts at layers 0..layers-1 (official `12 6`), capped at the student's depth
    length: int = 6  # tokens of each KD prefix: length/2 key + length/2 value tokens

    def check(self) -> None:
        at_least_one(SECTION, "layers", self.layers, " (layer 0 holds the KD token)")
        even_length(SECTION, "length", self.length)

    def in_effect(self, student_depth: int) -> "DCDLParams":
        return replace(self, layers=min(self.layers, student_depth))


@dataclass(frozen=True)
class DeiTParams(KDParams):
    """A DeiT-style distillation token: one zero-initialised token in the sequence, read by the KD head."""

    method: ClassVar[str] = "deit"


@dataclass(frozen=True)
class FitNetsParams(KDParams):
    """FitNets hints on the last block's tokens plus logit KD."""

    method: ClassVar[str] = "fitnets"
    reads_teacher_blocks: ClassVar[bool] = True
    # Official code 0.1; its published runs (2 GPUs, DataParallel) summed the loss of both replicas: about 0.2.
    feature_weight: float = 0.1

    def check_backbones(self, student: BackbonePreset, teacher: BackbonePreset) -> None:
        _same_tokens(self.method, student, teacher)


@dataclass(frozen=True)
class ReviewKDParams(KDParams):
    """ReviewKD's attention-based fusion chain over the student's blocks against the teacher's last blocks."""

    method: ClassVar[str] = "reviewkd"
    reads_teacher_blocks: ClassVar[bool] = True
    # Official code 0.2; its published runs (2 GPUs, DataParallel) summed the loss of both replicas: about 0.4.
    feature_weight: float = 0.2
    blocks: int | None = None  # n: the student's last n blocks against the teacher's last n; None: the student's depth

    def check(self) -> None:
        at_least_one(SECTION, "blocks", self.blocks)

    def n_blocks(self, student_depth: int) -> int:
        return self.blocks or student_depth

    def check_backbones(self, student: BackbonePreset, teacher: BackbonePreset) -> None:
        n = self.n_blocks(student.depth)
        if n > student.depth:
            raise ConfigError(f"{SECTION}.blocks={n} exceeds the student {student.name}'s {student.depth} blocks; "
                              f"use at most {student.depth}")
        if n > teacher.depth:
            raise ConfigError(f"distill.method='reviewkd' matches the student's last {n} blocks with the teacher's, but the "
                              f"teacher {teacher.name} has only {teacher.depth}; set {SECTION}.blocks <= {teacher.depth} "
                              "or pick a deeper teacher")
        _same_tokens(self.method, student, teacher)


KD_PARAMS: dict[str, type[KDParams]] = {
    cls.method: cls
    for cls in (NoKDParams, LogitKDParams, DKDParams, FitNetsParams, ReviewKDParams, DeiTParams, DCDLParams, CDLPromptParams)
}


def resolve_kd_params(method: str, overrides: dict[str, Any]) -> KDParams:
    return resolve_method_params(KD_PARAMS, "distillation method", SECTION, method, overrides)
