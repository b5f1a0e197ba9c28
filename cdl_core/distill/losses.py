"""Loss terms shared by the KD methods. Logits here are already restricted to the classes they compare."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cdl_core.distill.base import TaskClasses


def current_task_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, classes: TaskClasses) -> torch.Tensor:
    """CE with past-task logits masked to -inf and future classes absent: softmax over the current task only."""
    return F.cross_entropy(logits[:, classes.past : classes.seen], targets - classes.past)


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def decoupled_kd(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float, temperature: float
) -> torch.Tensor:
    """DKD (Zhao et al. 2022): alpha * TCKD (target vs rest, binary) + beta * NCKD (among non-targets), each T^2-scaled."""
    target_mask = F.one_hot(targets, student.shape[1]).bool()
    p_student = F.softmax(student / temperature, dim=1)
    p_teacher = F.softmax(teacher / temperature, dim=1)
    binary_student = torch.stack((p_student[target_mask], p_student.masked_fill(target_mask, 0).sum(1)), dim=1)
    binary_teacher = torch.stack((p_teacher[target_mask], p_teacher.masked_fill(target_mask, 0).sum(1)), dim=1)
    tckd = F.kl_div(binary_student.clamp_min(1e-12).log(), binary_teacher, reduction="batchmean")
    # Non-target distribution: drop the target class by masking its logit to -inf before the softmax.
    nckd = F.kl_div(
        F.log_softmax((student / temperature).masked_fill(target_mask, float("-inf")), dim=1).masked_fill(target_mask, 0),
        F.softmax((teacher / temperature).masked_fill(target_mask, float("-inf")), dim=1),
        reduction="batchmean",
    )
    return (alpha * tckd + beta * nckd) * temperature**2
