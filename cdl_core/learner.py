"""Trains a student (and its teacher, if any) over a class-incremental task stream, task by task.

The pieces that vary live beside this module: where the teacher comes from (`cdl_core.teacher_source`), the
frozen inputs of a step (`cdl_core.frozen_inputs`), training a role on a task (`cdl_core.training`) and evaluation
(`cdl_core.evaluation`). Randomness is split by phase: each (role, task) phase seeds torch from (seed, role, task),
so a student's results do not depend on whether its teacher was trained in this process or loaded from a teacher
store. With the sequential schedule a teacher depends on no student setting: `teacher_identity` lists what it does
depend on, and `teacher_key` addresses it in a `TeacherStore`, so one trained teacher serves many students.
"""
from __future__ import annotations

import logging
import platform
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch.utils.data import Dataset

from cdl_core import metrics
from cdl_core.backbones import create_backbone
from cdl_core.config import RunConfig
from cdl_core.data import ClassIncrementalStream, build_stream
from cdl_core.data.draws import derive_seed
from cdl_core.devices import resolve_device
from cdl_core.distill import KDContext, TaskClasses, build_kd_method
from cdl_core.errors import ConfigError
from cdl_core.evaluation import Evaluator
from cdl_core.frozen_inputs import FrozenInputs, FrozenPasses
from cdl_core.model import ContinualModel, make_head
from cdl_core.prompts import build_prompt_method
from cdl_core.signal_cache import stored_signals
from cdl_core.teacher_identity import TRAINER_VERSION, content_key, teacher_identity, teacher_key  # noqa: F401 (re-exported)
from cdl_core.teacher_source import JointTeacher, StoredTeacher, TeacherSource
from cdl_core.teacher_store import TeacherStore
from cdl_core.training import PhaseTrainer

log = logging.getLogger(__name__)

ROLES = ("student", "teacher")


@dataclass
class TaskReport:
    """What one finished task adds: accuracy rows R[t][0..t] per role and split, and summaries so far."""

    task_id: int
    rows: dict[str, dict[str, list[float]]]  # role -> split ("test"/"val") -> accuracies on tasks 0..t
    summary: dict[str, float]  # e.g. student_test_avg_acc, student_val_forgetting, teacher_test_avg_acc
    seconds: dict[str, float]
    teacher_trained: bool | None = None  # sequential teacher: trained here (True) or loaded from the store (False)


@dataclass
class RunState:
    """Accuracy matrices per role and split, filled row by row."""

    matrices: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def add(self, role: str, split: str, row: list[float]) -> None:
        self.matrices.setdefault(role, {}).setdefault(split, []).append(row)


class ContinualRun:
    def __init__(
        self, cfg: RunConfig, teacher_store: TeacherStore | str | Path | None = None, require_teacher: bool = False,
        stream: ClassIncrementalStream | None = None,
        teacher_lock: Callable[[str], AbstractContextManager] | None = None,
    ) -> None:
        """`teacher_store`: load the teacher task by task from there, and store the tasks it trains.
        `teacher_lock(name)`: a lock held while training a teacher task that is not stored yet, so that
        processes sharing the store train it once (the orchestrator passes a cluster-wide one)."""
        self.cfg = cfg.validate()
        if teacher_store is not None and (cfg.teacher is None or cfg.distill.schedule != "sequential"):
            raise ConfigError("a teacher store needs a teacher and distill.schedule='sequential' (a joint teacher trains with its student)")
        if require_teacher and teacher_store is None:
            raise ConfigError("require_teacher needs a teacher store to load the teacher from")
        self.device = resolve_device(cfg.train.device)
        self.student_backbone = create_backbone(cfg.student).to(self.device)
        self.teacher_backbone = create_backbone(cfg.teacher).to(self.device) if cfg.teacher else None
        if cfg.train.compile:
            for backbone in (self.student_backbone, self.teacher_backbone):
                if backbone is not None:
                    backbone.enable_compile()
        sb = self.student_backbone
        self.stream = stream or build_stream(cfg.data, sb.image_size, sb.mean, sb.std)
        self.teacher = self._build_model("teacher") if cfg.teacher else None
        self.student = self._build_model("student")
        self.frozen = FrozenPasses(cfg, self.device, self.student_backbone, self.teacher_backbone)
        self.frozen.attach_models(self.teacher, self.student)
        self.trainer = PhaseTrainer(cfg, self.frozen)
        # Bound methods and partials of the parts, never closures over the run: a reference cycle would keep a finished
        # run's models alive until the garbage collector runs (tests/test_teacher_copies.py counts them).
        self.evaluator = Evaluator(self.stream, self.frozen, partial(self.trainer.loader, batch_size=cfg.train.eval_batch_size, shuffle=False))
        self.teacher_source = self._teacher_source(teacher_store, require_teacher, teacher_lock)
        if isinstance(self.teacher_source, StoredTeacher):
            n_train = sum(len(task.train) for task in self.stream.tasks)
            self.trainer.signals = stored_signals(cfg, self.teacher_source.entry, self.teacher_source.lock, self.frozen,
                                                  self.stream.n_classes, n_train, self.device)
        self.state = RunState()
        self.completed_tasks = 0

    # -- construction ---------------------------------------------------------------------------------
    def _build_model(self, role: str) -> ContinualModel:
        torch.manual_seed(derive_seed(self.cfg.train.seed, role, "init"))
        backbone = self.teacher_backbone if role == "teacher" else self.student_backbone
        query_backbone = self.teacher_backbone if role == "teacher" and self.cfg.query == "own" else self.student_backbone
        n_tasks, n_classes = self.stream.n_tasks, self.stream.n_classes
        prompt = build_prompt_method(
            self.cfg.prompt.method, self.cfg.prompt.params_for(role), backbone.embed_dim, query_backbone.embed_dim, n_tasks, backbone.depth,
        )
        kd = None
        if role == "student" and self.teacher is not None:
            ctx = KDContext(
                student_dim=backbone.embed_dim, teacher_dim=self.teacher_backbone.embed_dim,
                student_depth=backbone.depth, teacher_depth=self.teacher_backbone.depth, n_classes=n_classes,
                n_tasks=n_tasks, prompt_method=self.cfg.prompt.method, prompt_params=prompt.params,
                teacher_prompt_layers=self.teacher.prompt.layers,
                make_head=partial(make_head, prompt.head, n_classes=n_classes),
            )
            kd = build_kd_method(self.cfg.distill, ctx)
        return ContinualModel(backbone, prompt, n_classes, kd).to(self.device)

    def _teacher_source(self, store, require: bool, lock) -> TeacherSource | None:
        if self.teacher is None:
            return None
        train, evaluate = partial(self.trainer.train_phase, "teacher"), partial(self.evaluator.splits, "teacher")
        if self.cfg.distill.schedule == "joint":
            return JointTeacher(self.teacher, train, evaluate)
        if store is None:
            return TeacherSource(self.teacher, train, evaluate)
        store = store if isinstance(store, TeacherStore) else TeacherStore(store)
        identity = teacher_identity(self.cfg)
        entry = store.entry(content_key(identity))
        entry.check(identity, self.teacher_facts())
        return StoredTeacher(self.teacher, train, evaluate, entry, identity, self.teacher_facts(), lock or (lambda name: nullcontext()), require)

    def teacher_facts(self) -> dict[str, str]:
        """What the config names but only loading shows (the weights' and data split's hashes): a stored teacher
        made with other weights or data under the same config is refused."""
        facts = {
            "teacher_weights_sha256": self.teacher_backbone.weights_sha256, "data_fingerprint": self.stream.fingerprint(),
            "n_tasks": str(self.n_tasks),
        }
        if self.cfg.query == "student":
            facts["query_weights_sha256"] = self.student_backbone.weights_sha256
        return facts

    @property
    def teacher_entry(self):
        """The teacher store entry this run's teacher is loaded from and stored in (None without a store)."""
        return self.teacher_source.entry if isinstance(self.teacher_source, StoredTeacher) else None

    @property
    def teacher_wait_seconds(self) -> float:
        """Time spent waiting for another process to train a shared teacher task."""
        return self.teacher_source.wait_seconds if isinstance(self.teacher_source, StoredTeacher) else 0.0

    # -- running ----------------------------------------------------------------------------------------
    @property
    def n_tasks(self) -> int:
        return self.stream.n_tasks

    def run(self, on_task: Callable[[TaskReport], None] | None = None) -> dict[str, Any]:
        while self.completed_tasks < self.n_tasks:
            report = self.run_task()
            if on_task is not None:
                on_task(report)
        return self.results()

    def run_task(self) -> TaskReport:
        t = self.completed_tasks
        task = self.stream.tasks[t]
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        teacher_rows, teacher_trained = None, None
        if self.teacher_source is not None:
            teacher_rows, teacher_trained = self.teacher_source.before_student(task)
            if teacher_rows is not None:
                seconds["teacher"] = time.perf_counter() - start
        mid = time.perf_counter()
        self.trainer.train_phase("student", task)
        if isinstance(self.teacher_source, JointTeacher):
            teacher_rows = self.evaluator.splits("teacher", t)
        seconds["student"] = time.perf_counter() - mid
        rows = {"student": self.evaluator.splits("student", t)}
        if teacher_rows is not None:
            rows["teacher"] = teacher_rows
        for role, by_split in rows.items():
            for split, row in by_split.items():
                self.state.add(role, split, row)
        self.completed_tasks += 1
        seconds["total"] = time.perf_counter() - start
        report = TaskReport(t, rows, self.summary(), seconds, teacher_trained)
        log.info("task %d/%d done in %.1fs: %s", t + 1, self.n_tasks, seconds["total"], report.summary)
        return report

    # The step and its parts, as the benchmarks and tests call them.
    def frozen_inputs(self, role: str, images: torch.Tensor, t: int) -> FrozenInputs:
        return self.frozen.inputs(role, images, t)

    def losses(self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
               frozen: FrozenInputs | None = None) -> list[torch.Tensor]:
        return self.trainer.losses(role, images, targets, t, classes, frozen)

    def step(self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
             optimizers: list[torch.optim.Optimizer], frozen: FrozenInputs | None = None) -> list[torch.Tensor]:
        return self.trainer.step(role, images, targets, t, classes, optimizers, frozen)

    def accuracy(self, role: str, dataset: Dataset, t: int) -> float:
        return self.evaluator.accuracy(role, dataset, t)

    # -- results and resume ------------------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        out = {}
        for role, by_split in self.state.matrices.items():
            for split, matrix in by_split.items():
                for name, value in metrics.summarize(matrix, shown=self.cfg.forgetting).items():
                    out[f"{role}_{split}_{name}"] = value
        return out

    def results(self) -> dict[str, Any]:
        backbones = {"student": self.student_backbone}
        if self.teacher_backbone is not None:
            backbones["teacher"] = self.teacher_backbone
        return {
            "config": self.cfg.to_dict(),
            "completed_tasks": self.completed_tasks,
            "matrices": self.state.matrices,
            "summary": self.summary(),
            "protocol": self.cfg.protocol_record(),
            "data_split": self.stream.describe(),
            "environment": {
                "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                "device": str(self.device), "trainer_version": TRAINER_VERSION,
                "backbones": {
                    r: {"preset": b.preset.name, "weights": b.weights, "pretrained_tag": getattr(self.cfg, r).pretrained_tag,
                        "weights_sha256": b.weights_sha256} for r, b in backbones.items()
                },
            },
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished task (the orchestrator checkpoints this).
        A stored teacher is left out: it is in the teacher store, and one copy there serves every trial."""
        state = {"completed_tasks": self.completed_tasks, "matrices": self.state.matrices, "student": self.student.trainable_state_dict()}
        if self.teacher is not None and not self.teacher_source.stored:
            state["teacher"] = self.teacher.trainable_state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = state["completed_tasks"]
        for role in ROLES:
            model = self.teacher if role == "teacher" else self.student
            if model is None or role not in state:
                continue
            if done:
                model.prompt.current_task = done - 1
            model.load_trainable_state_dict(state[role])
        if self.teacher is not None and "teacher" not in state and done:
            self.teacher_source.restore(done, self.stream.tasks)
        self.state = RunState(state["matrices"])
        self.completed_tasks = done

