"""The training stream's random draws as pure functions of where they happen.

Image k of a task's epoch is augmented from a seed of (seed, task, epoch, k) alone, and an epoch's batch order is
drawn from (seed, task, epoch) alone: not from the role being trained, the number of data workers, the batch an
image lands in or the process that asks. So a teacher and every student of one seed see the same batches, and what
frozen models compute on them is the same in every trial (computed once: `cdl_core.signal_cache`).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import Dataset


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class EpochImages(Dataset):
    """A task's training images as one epoch draws them: item k is (image, label, k), the image augmented with
    torch's RNG seeded from (seed, task, epoch, k) inside a fork of it, so drawing leaves the caller's RNG as it was."""

    def __init__(self, dataset: Dataset, seed: int, task: int, epoch: int) -> None:
        self.dataset = dataset
        self.epoch_seed = derive_seed(seed, task, epoch, "augment")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int, int]:
        with torch.random.fork_rng(devices=()):
            # the CPU generator only: torch.manual_seed also queues a seed (with a stack trace) for every accelerator
            # kind, about 1 ms an image
            torch.random.default_generator.manual_seed(derive_seed(self.epoch_seed, k))
            image, label = self.dataset[k]
        return image, label, k


def epoch_order(n_images: int, seed: int, task: int, epoch: int) -> list[int]:
    """The order in which an epoch visits a task's `n_images` training images."""
    generator = torch.Generator().manual_seed(derive_seed(seed, task, epoch, "order"))
    return torch.randperm(n_images, generator=generator).tolist()
