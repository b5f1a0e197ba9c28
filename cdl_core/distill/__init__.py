"""Distillation methods, one per module, registered by name in KD_METHODS."""
from cdl_core.distill import cdl_prompt, dcdl, deit, dkd, fitnets, kd, none, reviewkd  # noqa: F401  (registration)
from cdl_core.distill.base import KD_METHODS, KDContext, KDMethod, TaskClasses, TeacherSignal, build_kd_method

__all__ = ["KD_METHODS", "KDContext", "KDMethod", "TaskClasses", "TeacherSignal", "build_kd_method"]
