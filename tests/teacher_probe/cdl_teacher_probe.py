"""Counts the copies of a run's teacher that a process holds, for tests/test_teacher_copies.py.

A copy is counted by content, not by object: among every live tensor the garbage collector tracks (module
parameters, loaded state dicts, checkpoints, caches, also tensors only reachable from dicts, lists and tuples),
the distinct storages (by `untyped_storage().data_ptr()`) whose shape, dtype and values equal one of the
teacher's reference tensors: distinctive frozen backbone weights (patch embedding, last block) and every
trainable tensor of the teacher (prompt parameters, head). Live `FrozenViT`s of the teacher's preset, timm
`VisionTransformer`s of its shape and `ContinualModel`s on such a backbone are counted too.

`patch_learner()` wraps `cdl_core.learner.ContinualRun.__init__` and `.run_task` (`install_import_hook()` does
that as soon as `cdl_core.learner` is imported) so that, in a run with a teacher, one
JSON line per (process, phase, task) with those counts is appended to `$CDL_TEACHER_PROBE_DIR/<pid>.jsonl`.
The sweep's Ray workers get it from `sitecustomize.py` next to this file (see there). The probe only reads:
it draws no random numbers, does not run the garbage collector unless a count is off, and swallows its own
errors (reported as an "error" line, so a test sees them).
"""
from __future__ import annotations

import functools
import gc
import json
import os
import time
import traceback
from typing import Any

ENV = "CDL_TEACHER_PROBE_DIR"


def reference_tensors(run: Any) -> dict[str, Any]:
    """name -> one tensor of the teacher whose value identifies it: backbone weights and trainable state."""
    vit = run.teacher_backbone.vit
    refs = {
        "backbone.patch_embed.proj.weight": vit.patch_embed.proj.weight,
        "backbone.blocks[-1].attn.qkv.weight": vit.blocks[-1].attn.qkv.weight,
        "backbone.blocks[-1].mlp.fc2.weight": vit.blocks[-1].mlp.fc2.weight,
    }
    for name, param in run.teacher.named_parameters():
        if not name.startswith("backbone."):  # prompt parameters and the head: what the teacher store holds
            refs[name] = param
    return refs


def count_teacher_copies(run: Any) -> dict[str, Any]:
    """How many copies of `run`'s teacher this process holds (1 each when there is no extra copy).

    One pass over gc.get_objects(): every Python tensor object is tracked by the garbage collector (torch's
    tensor type is a GC type), so tensors held only in a dict, list or tuple (a loaded state dict, a
    checkpoint, a cache) are in it too. Types are tested with type(), never isinstance(), so no object's
    __class__ property runs (some torch module proxies warn on that)."""
    import torch
    from cdl_core.backbones import FrozenViT
    from cdl_core.model import ContinualModel
    from timm.models.vision_transformer import VisionTransformer

    refs = reference_tensors(run)
    by_shape: dict[tuple, list[tuple[str, Any]]] = {}
    for name, ref in refs.items():
        by_shape.setdefault((tuple(ref.shape), ref.dtype), []).append((name, ref))
    storages: dict[str, set] = {name: set() for name in refs}
    tensors = {name: 0 for name in refs}
    preset = run.teacher_backbone.preset.name
    ref_vit = run.teacher_backbone.vit
    vit_shape = (ref_vit.embed_dim, len(ref_vit.blocks), tuple(ref_vit.patch_embed.proj.weight.shape))
    backbones = vits = models = 0
    tensor_type = torch.Tensor
    with torch.no_grad():
        for obj in gc.get_objects():
            kind = type(obj)
            try:
                if issubclass(kind, tensor_type):
                    if obj.is_sparse or obj.is_meta or obj.numel() == 0:
                        continue
                    for name, ref in by_shape.get((tuple(obj.shape), obj.dtype), ()):
                        other = obj if obj.device == ref.device else obj.detach().to(ref.device)
                        if torch.equal(other, ref):
                            storages[name].add((str(obj.device), obj.untyped_storage().data_ptr()))
                            tensors[name] += 1
                elif issubclass(kind, FrozenViT):
                    backbones += obj.preset.name == preset
                elif issubclass(kind, VisionTransformer):
                    vits += (obj.embed_dim, len(obj.blocks), tuple(obj.patch_embed.proj.weight.shape)) == vit_shape
                elif issubclass(kind, ContinualModel):
                    models += type(obj.backbone) is FrozenViT and obj.backbone.preset.name == preset
            except Exception:  # noqa: BLE001 - an odd object must not stop the count
                continue
    return {
        "storages": {name: len(s) for name, s in storages.items()},  # the copies: what must be 1
        "tensors": tensors,  # tensor objects (views of one storage count once above)
        "frozen_vits": backbones, "timm_vits": vits, "continual_models": models,
    }


def max_copies(counts: dict[str, Any]) -> int:
    return max([*counts["storages"].values(), counts["frozen_vits"], counts["timm_vits"], counts["continual_models"]])


def min_copies(counts: dict[str, Any]) -> int:
    return min([*counts["storages"].values(), counts["frozen_vits"], counts["timm_vits"], counts["continual_models"]])


def _trial_id() -> str | None:
    import sys
    import warnings

    tune = sys.modules.get("ray.tune")  # a trial process has it imported (orchestrator.trainable)
    if tune is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "meant to only be called inside a function executed by a Tuner"
            return tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - not in a Tune trial (e.g. a unit test)
        return None


def record(run: Any, phase: str, task: int | None, directory: str | None = None) -> dict[str, Any] | None:
    """Count and append one JSON line for `run` (a ContinualRun) to <directory>/<pid>.jsonl; None without a teacher."""
    if getattr(run, "teacher", None) is None:
        return None
    directory = directory or os.environ[ENV]
    started = time.perf_counter()
    line: dict[str, Any] = {"pid": os.getpid(), "trial_id": _trial_id(), "phase": phase, "task": task}
    try:
        cfg = run.cfg
        line |= {"teacher": cfg.teacher.preset, "student": cfg.student.preset, "method": cfg.prompt.method,
                 "kd": cfg.distill.method, "teacher_key": run.teacher_entry.key if run.teacher_entry is not None else None,
                 "completed_tasks": run.completed_tasks}
        counts = count_teacher_copies(run)
        line["counts"] = counts
        if max_copies(counts) != 1:  # held only by garbage not collected yet, or really held? Say which.
            gc.collect()
            line["counts_after_gc_collect"] = count_teacher_copies(run)
    except Exception:  # noqa: BLE001 - never break the run; the test fails on an "error" line
        line["error"] = traceback.format_exc()
    line["probe_seconds"] = round(time.perf_counter() - started, 3)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a") as out:
        out.write(json.dumps(line) + "\n")
    return line


def patch_learner(learner: Any, directory: str | None = None) -> None:
    """Wrap ContinualRun.__init__ and .run_task of the module `learner` (once)."""
    cls = learner.ContinualRun
    if getattr(cls, "_teacher_probe_installed", False):
        return
    init, run_task = cls.__init__, cls.run_task

    @functools.wraps(init)
    def probed_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        record(self, "init", None, directory)

    @functools.wraps(run_task)
    def probed_run_task(self, *args, **kwargs):
        report = run_task(self, *args, **kwargs)
        record(self, "task", report.task_id, directory)
        return report

    cls.__init__, cls.run_task = probed_init, probed_run_task
    cls._teacher_probe_installed = True
    cls._teacher_probe_originals = (init, run_task)


def unpatch_learner(learner: Any) -> None:
    cls = learner.ContinualRun
    if getattr(cls, "_teacher_probe_installed", False):
        cls.__init__, cls.run_task = cls._teacher_probe_originals
        del cls._teacher_probe_installed, cls._teacher_probe_originals


class _LearnerImportHook:
    """A sys.meta_path finder that patches cdl_core.learner right after it is first executed, so the probe
    costs nothing (no torch import) in processes that never import it."""

    target = "cdl_core.learner"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        import sys

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader

        class Loader:
            def create_module(self, spec):
                return original.create_module(spec)

            def exec_module(self, module):
                original.exec_module(module)
                patch_learner(module)

            def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
                return getattr(original, name)

        spec.loader = Loader()
        return spec


def install_import_hook() -> None:
    """Patch cdl_core.learner now if it is imported, else as soon as it is."""
    import sys

    if "cdl_core.learner" in sys.modules:
        patch_learner(sys.modules["cdl_core.learner"])
    elif not any(isinstance(f, _LearnerImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _LearnerImportHook())
