"""Distillation methods, one per module, registered by name in KD_METHODS."""
from cdl_core.distill import cdl_prompt, dkd, kd, none  # noqa: F401  (registration)
from cdl_core.distill.base import KD_METHODS, KDContext, KDMethod, TaskClasses, build_kd_method

__all__ = ["KD_METHODS", "KDContext", "KDMethod", "TaskClasses", "build_kd_method"]
