"""Where a run computes, and in which precision."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from cdl_core.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """train.precision: bf16 autocasts the forward passes; fp32 runs as written."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
