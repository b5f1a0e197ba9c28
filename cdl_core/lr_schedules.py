"""Per-epoch learning-rate schedules of one task (a fresh optimizer and schedule per task)."""
from __future__ import annotations

import math

import torch


def official_cosine_factor(epoch: int, epochs: int) -> float:
    """The official CDL code's factor of the base lr in epoch `epoch` (0-based) of `epochs`:
    cos(99 pi max(e - 1, 0) / (200 (K - 1))) — epochs 0 and 1 at the full lr, then down to about 0.1 (K = 20)."""
    if epochs == 1:
        return 1.0
    return math.cos(99 * math.pi * max(epoch - 1, 0) / (200 * (epochs - 1)))


def build_lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The scheduler stepped once after each epoch (None: constant lr)."""
    if schedule == "official_cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: official_cosine_factor(epoch, epochs))
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return None
