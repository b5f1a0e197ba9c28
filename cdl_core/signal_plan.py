"""Whether a run's students read their frozen signals from the teacher store (`cdl_core.signal_cache`), and how big
one teacher's signals are: from the config alone, without torch, so `--dry-run` prints it."""
from __future__ import annotations

from dataclasses import dataclass

from cdl_core.catalog.datasets import DATASETS
from cdl_core.catalog.distill import KD_PARAMS
from cdl_core.catalog.presets import PRESETS
from cdl_core.catalog.prompts import resolve_prompt_params
from cdl_core.config import RunConfig

FLOAT_BYTES = 4  # stored as the steps read them: float32


@dataclass(frozen=True)
class SignalCachePlan:
    nbytes: int  # one teacher's signals over the whole stream (0 when there are none to store)
    online_because: str | None  # why the students compute them in every step instead; None: they read the cache


def estimated_train_images(cfg: RunConfig) -> int:
    """The stream's training images over all tasks, from the dataset's metadata (validation split carved out)."""
    info = DATASETS[cfg.data.name]
    cap = cfg.data.train_per_class if cfg.data.train_per_class is not None else info.default_train_per_class
    images = min(info.train_images, cap * info.n_classes) if cap else info.train_images
    return round(images * (1 - (cfg.data.val_fraction or 0.0)))


def signal_cache_plan(cfg: RunConfig, train_images: int | None = None) -> SignalCachePlan:
    """`train_images`: the stream's actual count when it is built (else estimated from the dataset's metadata)."""
    if cfg.teacher is None:
        return SignalCachePlan(0, "no teacher")
    if cfg.distill.schedule != "sequential":
        return SignalCachePlan(0, "the joint schedule's teacher changes with its student")
    kd = KD_PARAMS[cfg.distill.method]
    if kd.method == "none":
        return SignalCachePlan(0, "distill.method='none' reads no teacher signal")
    if kd.needs_teacher_prompts:
        return SignalCachePlan(0, f"distill.method={kd.method!r} reads the teacher's prompts")
    if kd.reads_teacher_blocks:
        return SignalCachePlan(0, f"distill.method={kd.method!r} reads the teacher's block outputs (too big to store)")
    if cfg.query != "student":
        return SignalCachePlan(0, "query='own': the student's queries are not the teacher's")
    info = DATASETS[cfg.data.name]
    n_tasks = info.n_tasks(cfg.data.n_tasks)
    query_dim = PRESETS[cfg.student.preset].embed_dim if resolve_prompt_params(cfg.prompt.method, cfg.prompt.params).uses_query else 0
    epochs = cfg.train.epochs if cfg.data.train_augment else 1
    images = train_images if train_images is not None else estimated_train_images(cfg)
    nbytes = images * epochs * (info.n_classes // n_tasks + query_dim) * FLOAT_BYTES
    if cfg.train.signal_cache_max_gb == 0:
        return SignalCachePlan(nbytes, "train.signal_cache_max_gb=0 turns the signal cache off")
    if nbytes > cfg.train.signal_cache_max_gb * 2**30:
        return SignalCachePlan(nbytes, f"one teacher's signals would take {nbytes / 2**30:.1f} GiB, over "
                                       f"train.signal_cache_max_gb={cfg.train.signal_cache_max_gb:g}")
    return SignalCachePlan(nbytes, None)
