"""Protocols: named sets of the choices that change a run's numbers without changing its method.

`official` (the default) is what the official CDL code (IRVLUTD/CDL) does; `timm` is what timm's pretrained ViTs
and torch's schedulers assume. Each setting is also its own config field: a field left unset (None) takes the
run's protocol value, a field set explicitly wins, and the validated config records every value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cdl_core.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    settings: dict[str, Any]  # dotted RunConfig field -> value


OFFICIAL = Protocol("official", "as the official CDL code computes it", {
    "data.input_scaling": "unit",  # ToTensor only: images reach the ViT in [0, 1]
    "data.val_fraction": 0.0,  # every training image trains
    "train.lr_schedule": "official_cosine",  # lr * cos(99 pi max(e-1, 0) / (200 (K-1)))
    "train.drop_last": True,  # training loaders drop the last partial batch
    "distill.prediction": "weighted",  # (1 - a) z_last + a z_kd
    # A frozen APT teacher's signal uses the copy of its prompts merged over the earlier tasks (zeros on the first):
    # the official code merges after the student's phase and queries the teacher in eval mode.
    "distill.teacher_merged_prompts": "previous",
    "forgetting": "cdl",  # mean over all T tasks of R[j][j] - R[T][j], as the official trainer prints it
})

# The differences from `official`, in one place.
TIMM = Protocol("timm", "what timm's ViTs and torch's schedulers assume", OFFICIAL.settings | {
    "data.input_scaling": "mean_std",  # normalised with the weights' own mean/std (timm's ViTs: 0.5/0.5)
    "data.val_fraction": 0.1,  # a validation split carved from each task's training images
    "train.lr_schedule": "cosine",  # torch's CosineAnnealingLR over the task's epochs
    "train.drop_last": False,  # every training image every epoch
    "distill.teacher_merged_prompts": "current",  # the teacher's merged prompts after this task, as it is evaluated
    "forgetting": "chaudhry",  # mean over j < T of max_{l<T} R[l][j] - R[T][j] (Chaudhry et al., 2018)
})

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (OFFICIAL, TIMM)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ConfigError(f"protocol={name!r} is not valid; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_fields(protocol: str) -> list[tuple[str, str, Any]]:
    """(section, field, value) of each setting of `protocol`; section "" is the run config's own fields."""
    return [(*dotted.rpartition(".")[::2], value) for dotted, value in get_protocol(protocol).settings.items()]


def fill_from_protocol(section: Any, prefix: str, protocol: str) -> None:
    """Set each of `section`'s protocol fields that is still None (unset) to `protocol`'s value; `prefix` is the
    section's name in the dotted keys ("" for the run config's own fields)."""
    for owner, name, value in protocol_fields(protocol):
        if owner == prefix and getattr(section, name) is None:
            setattr(section, name, value)
