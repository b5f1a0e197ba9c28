"""What a stored teacher is: the content key of everything a sequential-schedule teacher's training depends on.

Computed from the config alone (no torch, no weights or data loaded), so planning a sweep counts its distinct
teachers without building one; the store (cdl_core.teacher_store) addresses entries by this key.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from cdl_core.catalog.presets import weights_source_id
from cdl_core.catalog.prompts import resolve_prompt_params
from cdl_core.config import RunConfig
from cdl_core.errors import ConfigError

# Bump when the training math changes, so stored teachers made by older code are not reused.
# 2: frozen outputs precomputed per task without augmentation (batched differently: last-bit differences).
# (A student's frozen teacher now selects prompts as at inference; that changes students, not teachers.)
# 3: the protocol's fields (input scaling, lr schedule, dropped batches, validation fraction) enter the identity.
# 4: augmentation and batch order are functions of (seed, task, epoch[, image]) only, the same for teacher and student.
TRAINER_VERSION = 4

# What a teacher's training does not depend on: where things run and how evaluation is batched.
_TRAIN_FIELDS_NOT_IN_TEACHER = ("device", "num_workers", "eval_batch_size", "signal_cache_max_gb")
_DATA_FIELDS_NOT_IN_TEACHER = ("root", "download")


def teacher_identity(cfg: RunConfig) -> dict[str, Any]:
    """Everything a sequential-schedule teacher's training depends on, from the config alone (no weights or
    data are loaded): its backbone and weights source, the query backbone, the prompt method with the teacher's
    resolved parameters, the stream (with the protocol's input scaling and validation fraction), the optimisation
    settings and seed (with the lr schedule and dropped batches), and the training code's version. KD settings,
    the prediction weighting, the forgetting shown and the student's own backbone (unless it is the query
    backbone) are not in it."""
    cfg.validate()
    if cfg.teacher is None or cfg.distill.schedule != "sequential":
        raise ConfigError("only a sequential-schedule teacher can be stored and shared (a joint teacher trains with its student)")
    return {
        "teacher": {"preset": cfg.teacher.preset, "weights": weights_source_id(cfg.teacher.preset, cfg.teacher.weights, cfg.teacher.pretrained_tag)},
        "query_backbone": (
            {"preset": cfg.student.preset, "weights": weights_source_id(cfg.student.preset, cfg.student.weights, cfg.student.pretrained_tag)}
            if cfg.query == "student" else "own"
        ),
        "prompt": {"method": cfg.prompt.method, "params": asdict(resolve_prompt_params(cfg.prompt.method, cfg.prompt.params_for("teacher")))},
        # the split lists' content is checked through the stream's fingerprint (teacher facts), not their path
        "data": {k: v for k, v in asdict(cfg.data).items() if k not in _DATA_FIELDS_NOT_IN_TEACHER}
        | {"split_files": "official" if cfg.data.split_files else None},
        "train": {k: v for k, v in asdict(cfg.train).items() if k not in _TRAIN_FIELDS_NOT_IN_TEACHER},
        "trainer_version": TRAINER_VERSION,
    }


def teacher_key(cfg: RunConfig) -> str:
    return content_key(teacher_identity(cfg))


def content_key(identity: dict[str, Any]) -> str:
    """Stable hash of a JSON-serialisable identity: key order, tuples vs lists and 0 vs 0.0 do not matter."""
    canonical = json.dumps(_canonical(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # a config file's 0 and a default's 0.0 train the same teacher
    return value
