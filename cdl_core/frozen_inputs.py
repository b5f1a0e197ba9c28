"""The frozen inputs of a training step: what the frozen parts give it, computed without autograd state.

A student step of the sequential schedule needs the selection query (one frozen pass shared by teacher and student
unless query="own") and its frozen teacher's signal: logits, and what its KD method reads besides — the teacher's
prompt queries (CDL-Prompt's mapping) or the outputs of some of its blocks (FitNets, ReviewKD). Row i of every
tensor belongs to image i, so a task's worth can be precomputed once and indexed per batch (`take`).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, NamedTuple

import torch

from cdl_core.attach import ModelOutput
from cdl_core.backbones import FrozenViT
from cdl_core.config import RunConfig
from cdl_core.devices import autocast
from cdl_core.distill import TeacherSignal
from cdl_core.distill.prompt_mapping import teacher_prompt_queries
from cdl_core.model import ContinualModel

log = logging.getLogger(__name__)

# Beyond this a task's precomputed frozen outputs stay uncomputed (each step computes its own): a teacher's tapped
# blocks hold all its tokens, e.g. 12 blocks of a ViT-B are 7 MB per image.
PRECOMPUTE_MAX_BYTES = 4 * 2**30


def _leaves(tree: Any) -> list[torch.Tensor]:
    leaves: list[torch.Tensor] = []
    _tree(lambda x: leaves.append(x) or x, tree)
    return leaves


def _tree(fn: Callable[..., torch.Tensor], *trees: Any) -> Any:
    """`fn` applied leaf by leaf to equally shaped trees of tensors, dicts, named tuples and None."""
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    if isinstance(first, dict):
        return {key: _tree(fn, *(tree[key] for tree in trees)) for key in first}
    return type(first)(*(_tree(fn, *parts) for parts in zip(*trees)))


class FrozenInputs(NamedTuple):
    """A batch's outputs of the frozen parts: the trained role's selection query (None when its prompt method
    selects nothing), the teacher's query (joint schedule, where the teacher trains too) and a frozen teacher's
    signal."""

    query: torch.Tensor | None
    teacher_query: torch.Tensor | None = None
    teacher: TeacherSignal | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FrozenInputs":
        """The same inputs with `fn` applied to every tensor."""
        return _tree(fn, self)

    def take(self, index: torch.Tensor) -> "FrozenInputs":
        return self.map(lambda x: x[index])

    @staticmethod
    def concat(parts: list["FrozenInputs"]) -> "FrozenInputs":
        """Batches' inputs joined in order (a task's worth, for `take`)."""
        return _tree(lambda *xs: torch.cat(xs), *parts)


class FrozenPasses:
    """Computes the frozen inputs of the steps of one run."""

    def __init__(self, cfg: RunConfig, device: torch.device, student_backbone: FrozenViT, teacher_backbone: FrozenViT | None) -> None:
        self.cfg = cfg
        self.device = device
        self.student_backbone = student_backbone
        self.teacher_backbone = teacher_backbone
        self.teacher: ContinualModel | None = None  # set once the models are built
        self.student: ContinualModel | None = None
        self.uses_query = True

    def attach_models(self, teacher: ContinualModel | None, student: ContinualModel) -> None:
        self.teacher, self.student = teacher, student
        self.uses_query = student.prompt.params.uses_query

    def autocast(self):
        return autocast(self.cfg.train.precision, self.device)

    def queries(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Selection queries for (student, teacher): one frozen pass when they share the query backbone, none when
        the prompt method selects nothing."""
        if not self.uses_query:
            return None, None
        with self.autocast():
            student_q = self.student_backbone.query(images)
            if self.teacher is None:
                return student_q, None
            teacher_q = self.teacher_backbone.query(images) if self.cfg.query == "own" else student_q
        return student_q, teacher_q

    def inputs(self, role: str, images: torch.Tensor, t: int) -> FrozenInputs:
        """What the frozen parts give a training step of `role` on `images`."""
        student_q, teacher_q = self.queries(images)
        if role == "teacher":
            return FrozenInputs(teacher_q)
        if self.teacher is None or self.joint(role):
            return FrozenInputs(student_q, teacher_q)
        # The frozen teacher selects its prompts as at inference (DualPrompt: by key, not by task id), as the
        # official code does and as it will when the student is evaluated.
        signal = self.teacher_signal(images, teacher_q, t, merged=self.cfg.distill.teacher_merged_prompts, train=True)
        # Copied out of inference mode: the student's loss saves the signal for its backward pass.
        return FrozenInputs(student_q, None, _tree(lambda x: x.to(torch.float32, copy=True), signal))

    def teacher_signal(self, images: torch.Tensor, teacher_q: torch.Tensor | None, t: int, merged: str, train: bool) -> TeacherSignal:
        """The frozen teacher's signal for its student, under inference mode. `train`: for a training step (with the
        teacher blocks the KD loss reads), else for evaluation (only what predictions need)."""
        kd = self.student.kd
        taps = kd.teacher_taps if kd is not None and train else frozenset()
        with torch.inference_mode(), self.autocast():
            out = self.teacher(images, teacher_q, t, train=False, merged=merged, taps=taps)
            return self.signal(out, len(images), taps)

    def signal(self, teacher_out: ModelOutput, batch: int, taps: frozenset[int] = frozenset()) -> TeacherSignal:
        """What the student's KD method reads of a teacher output (detached where it needs gradients elsewhere)."""
        kd = self.student.kd
        # The prompt queries need no detach here: the mapping detaches what it reads.
        prompt_queries = teacher_prompt_queries(teacher_out.prompts.prefixes, batch) if kd is not None and kd.params.needs_teacher_prompts else None
        tapped = {block: teacher_out.taps[block].detach() for block in taps} if taps else None
        return TeacherSignal(teacher_out.logits.detach(), prompt_queries, tapped)

    def precompute(self, role: str, batches: Iterable[torch.Tensor], t: int, n_images: int) -> FrozenInputs | None:
        """Frozen outputs for every image of `batches` (a task's `n_images` training images in dataset order); None
        when they would not fit in PRECOMPUTE_MAX_BYTES (a teacher's tapped blocks are all its tokens), and then
        each step computes its own."""
        parts = []
        for images in batches:
            parts.append(self.inputs(role, images.to(self.device), t))
            if len(parts) == 1:
                per_image = sum(x.element_size() * x[0].numel() for x in _leaves(parts[0]))
                if per_image * n_images > PRECOMPUTE_MAX_BYTES:
                    log.info("the frozen outputs of task %d would take %.1f GiB; computing them every step instead",
                             t + 1, per_image * n_images / 2**30)
                    return None
        return FrozenInputs.concat(parts)

    def joint(self, role: str) -> bool:
        return role == "student" and self.teacher is not None and self.cfg.distill.schedule == "joint"
