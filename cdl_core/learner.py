"""Trains a student (and its teacher, if any) over a class-incremental task stream, task by task.

Randomness is split by phase: each (role, task) phase seeds torch from (seed, role, task), so a student's
results do not depend on whether its teacher was trained in this process or loaded from a teacher store.
With the sequential schedule a teacher depends on no student setting: `teacher_identity` lists what it does
depend on, and `teacher_key` addresses it in a `TeacherStore`, so one trained teacher serves many students.
"""
from __future__ import annotations

import hashlib
import logging
import platform
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import timm
import torch
from torch.utils.data import DataLoader, Dataset

from cdl_core import metrics
from cdl_core.backbones import FrozenViT, create_backbone
from cdl_core.config import RunConfig
from cdl_core.data import ClassIncrementalStream, TaskSplit, build_stream
from cdl_core.distill import KDContext, TaskClasses, build_kd_method
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.distill.prompt_mapping import teacher_prompt_queries
from cdl_core.lr_schedules import build_lr_schedule
from cdl_core.model import ContinualModel, ModelOutput
from cdl_core.prompts import build_prompt_method
from cdl_core.errors import ConfigError, TeacherStoreError
from cdl_core.teacher_identity import TRAINER_VERSION, content_key, teacher_identity, teacher_key  # noqa: F401 (re-exported)
from cdl_core.teacher_store import TeacherEntry, TeacherStore

log = logging.getLogger(__name__)

ROLES = ("student", "teacher")


def derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use train.device=cpu or auto")
    return torch.device(name)


@dataclass
class TaskReport:
    """What one finished task adds: accuracy rows R[t][0..t] per role and split, and summaries so far."""

    task_id: int
    rows: dict[str, dict[str, list[float]]]  # role -> split ("test"/"val") -> accuracies on tasks 0..t
    summary: dict[str, float]  # e.g. student_test_avg_acc, student_val_forgetting, teacher_test_avg_acc
    seconds: dict[str, float]
    teacher_trained: bool | None = None  # sequential teacher: trained here (True) or loaded from the store (False)


class TeacherSignal(NamedTuple):
    """What a student step takes from its teacher for a batch: logits, and the per-layer prompt queries a
    prompt-mapping KD method needs (None for the others). Detached: nothing flows back into the teacher."""

    logits: torch.Tensor
    prompt_queries: dict[int, torch.Tensor] | None


class FrozenInputs(NamedTuple):
    """A batch's outputs of the frozen parts: the trained role's selection query, the teacher's query (joint
    schedule, where the teacher trains too) and a frozen teacher's signal. Row i belongs to image i, so a task's
    worth can be precomputed and indexed (`take`)."""

    query: torch.Tensor
    teacher_query: torch.Tensor | None = None
    teacher: TeacherSignal | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "FrozenInputs":
        """The same inputs with `fn` applied to every tensor."""
        teacher = self.teacher
        if teacher is not None:
            prompts = None if teacher.prompt_queries is None else {l: fn(q) for l, q in teacher.prompt_queries.items()}
            teacher = TeacherSignal(fn(teacher.logits), prompts)
        return FrozenInputs(fn(self.query), None if self.teacher_query is None else fn(self.teacher_query), teacher)

    def take(self, index: torch.Tensor) -> "FrozenInputs":
        return self.map(lambda x: x[index])

    @staticmethod
    def concat(parts: list["FrozenInputs"]) -> "FrozenInputs":
        """Batches' inputs joined in order (a task's worth, for `take`)."""
        def cat(get: Callable[["FrozenInputs"], torch.Tensor]) -> torch.Tensor:
            return torch.cat([get(part) for part in parts])

        first, teacher = parts[0], None
        if first.teacher is not None:
            prompts = first.teacher.prompt_queries
            teacher = TeacherSignal(
                cat(lambda p: p.teacher.logits),
                None if prompts is None else {l: cat(lambda p, l=l: p.teacher.prompt_queries[l]) for l in prompts},
            )
        return FrozenInputs(cat(lambda p: p.query), None if first.teacher_query is None else cat(lambda p: p.teacher_query), teacher)


class IndexedDataset(Dataset):
    """(image, label, position) items, so a batch can be matched with precomputed per-image values."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        return (*self.dataset[index], index)


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
        self.teacher_entry: TeacherEntry | None = None
        if teacher_store is not None:
            store = teacher_store if isinstance(teacher_store, TeacherStore) else TeacherStore(teacher_store)
            self.teacher_identity = teacher_identity(cfg)
            self.teacher_entry = store.entry(content_key(self.teacher_identity))
            self.teacher_entry.check(self.teacher_identity, self.teacher_facts())
        self.require_teacher = require_teacher
        self.teacher_lock = teacher_lock or (lambda name: nullcontext())
        self.teacher_wait_seconds = 0.0  # time spent waiting for another process to train a shared teacher task
        self.teacher = self._build_model("teacher") if cfg.teacher else None
        self.student = self._build_model("student")
        self.state = RunState()
        self.completed_tasks = 0

    # -- construction ---------------------------------------------------------------------------------
    def _query_backbone(self, role: str) -> FrozenViT:
        if role == "teacher" and self.cfg.query == "own":
            return self.teacher_backbone
        return self.student_backbone

    def _build_model(self, role: str) -> ContinualModel:
        torch.manual_seed(derive_seed(self.cfg.train.seed, role, "init"))
        backbone = self.teacher_backbone if role == "teacher" else self.student_backbone
        n_tasks, n_classes = self.stream.n_tasks, self.stream.n_classes
        prompt = build_prompt_method(
            self.cfg.prompt.method, self.cfg.prompt.params, backbone.embed_dim,
            self._query_backbone(role).embed_dim, n_tasks, backbone.depth,
        )
        kd = None
        if role == "student" and self.teacher is not None:
            ctx = KDContext(
                student_dim=backbone.embed_dim, teacher_dim=self.teacher_backbone.embed_dim, n_classes=n_classes,
                n_tasks=n_tasks, prompt_method=self.cfg.prompt.method, prompt_params=prompt.params,
                teacher_prompt_layers=self.teacher.prompt.layers,
            )
            kd = build_kd_method(self.cfg.distill, ctx)
        return ContinualModel(backbone, prompt, n_classes, kd).to(self.device)

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
        if self.teacher is not None and self.cfg.distill.schedule == "sequential":
            teacher_rows, teacher_trained = self._teacher_task(task)
            seconds["teacher"] = time.perf_counter() - start
        mid = time.perf_counter()
        self._train_phase("student", task)
        if self.teacher is not None and self.cfg.distill.schedule == "joint":
            teacher_rows = self._evaluate_splits("teacher", t)
        seconds["student"] = time.perf_counter() - mid
        rows = {"student": self._evaluate_splits("student", t)}
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

    def _teacher_task(self, task: TaskSplit) -> tuple[dict[str, list[float]], bool]:
        """The teacher after `task`: loaded from the store when it is there, else trained (and stored).
        Returns its accuracy rows and whether it was trained here."""
        t, entry = task.task_id, self.teacher_entry
        if entry is None:
            self._train_phase("teacher", task)
            return self._evaluate_splits("teacher", t), True
        rows = self._load_teacher(t)
        if rows is not None:
            return rows, False
        if self.require_teacher:
            entry.load(t)  # raises the clear "no stored task" error
        waiting = time.perf_counter()
        with self.teacher_lock(f"{entry.key}/task_{t}"):
            self.teacher_wait_seconds += time.perf_counter() - waiting
            rows = self._load_teacher(t)  # another process may have stored it while this one waited
            if rows is not None:
                return rows, False
            start = time.perf_counter()
            self._train_phase("teacher", task)
            rows = self._evaluate_splits("teacher", t)
            entry.save(t, self.teacher.trainable_state_dict(), rows, self.teacher_identity, self.teacher_facts(), time.perf_counter() - start)
        log.info("teacher task %d trained and stored as %s", t, entry)
        return rows, True

    def _load_teacher(self, t: int) -> dict[str, list[float]] | None:
        """Load the stored teacher state after task `t`; None when it is not stored or fails its checksum."""
        entry = self.teacher_entry
        if not entry.has(t):
            return None
        try:
            state, record = entry.load(t)
        except TeacherStoreError as err:
            if self.require_teacher:
                raise
            log.warning("%s; training that task again", err)
            return None
        self.teacher.prompt.begin_task(t)
        self.teacher.load_trainable_state_dict(state)
        log.info("teacher task %d loaded from %s", t, entry)
        return record["rows"]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
            num_workers=self.cfg.train.num_workers, pin_memory=self.device.type == "cuda",
        )

    def _optimizer(self, model: ContinualModel) -> tuple[torch.optim.Optimizer, Any]:
        tc = self.cfg.train
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        return optimizer, build_lr_schedule(optimizer, tc.lr_schedule, tc.epochs)

    def _train_phase(self, role: str, task: TaskSplit) -> None:
        """Train `role` on one task; in the joint schedule the student phase steps the teacher too."""
        t, tc = task.task_id, self.cfg.train
        joint = self._joint(role)
        torch.manual_seed(derive_seed(tc.seed, role, t))
        classes = TaskClasses(past=task.classes[0], seen=task.classes[-1] + 1)
        learners = [self.teacher, self.student] if joint else [self.teacher if role == "teacher" else self.student]
        optimizers = []
        for model in learners:
            model.prompt.begin_task(t)
            model.train()
            optimizers.append(self._optimizer(model))
        # Without augmentation an image's frozen outputs are the same every epoch: compute them once.
        cached = self._precompute_frozen(role, task) if not self.cfg.data.train_augment and tc.epochs > 1 else None
        dataset = IndexedDataset(task.train) if cached is not None else task.train
        if tc.drop_last and len(dataset) < tc.batch_size:
            raise ConfigError(
                f"task {t + 1} has {len(dataset)} training images, fewer than train.batch_size={tc.batch_size}, and "
                "train.drop_last=true drops that one partial batch: nothing would train; lower the batch size or set train.drop_last=false"
            )
        loader = self._loader(dataset, tc.batch_size, shuffle=True, seed=derive_seed(tc.seed, role, t, "loader"), drop_last=tc.drop_last)
        for _ in range(tc.epochs):
            for batch in loader:
                images, targets = (x.to(self.device, non_blocking=True) for x in batch[:2])
                frozen = cached.take(batch[2].to(self.device)) if cached is not None else None
                self.step(role, images, targets, t, classes, [opt for opt, _ in optimizers], frozen)
            for _, scheduler in optimizers:
                if scheduler is not None:
                    scheduler.step()
        for model in learners:
            model.eval()

    def step(
        self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
        optimizers: list[torch.optim.Optimizer], frozen: FrozenInputs | None = None,
    ) -> list[torch.Tensor]:
        """One optimisation step of `role` on a batch (the joint schedule's student step updates its teacher
        first): `optimizers` in the order of the returned losses (teacher's, then student's)."""
        losses = self.losses(role, images, targets, t, classes, frozen)
        for optimizer, loss in zip(optimizers, losses):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return losses

    def losses(
        self, role: str, images: torch.Tensor, targets: torch.Tensor, t: int, classes: TaskClasses,
        frozen: FrozenInputs | None = None,
    ) -> list[torch.Tensor]:
        """The training losses of a batch: [teacher's] for the teacher phase, [teacher's, student's] for a joint
        student step, else [student's]. `frozen`: the batch's precomputed frozen outputs (computed when None)."""
        if frozen is None:
            frozen = self.frozen_inputs(role, images, t)
        with self._autocast():
            if role == "teacher":
                return [self._teacher_loss(images, targets, t, classes, frozen.query)[0]]
            losses, teacher = [], frozen.teacher
            if self._joint(role):  # the teacher steps on this batch first; the student learns from its (detached) output
                teacher_loss, teacher_out = self._teacher_loss(images, targets, t, classes, frozen.teacher_query)
                losses.append(teacher_loss)
                teacher = self._signal(teacher_out, len(images))
            prompt_queries = teacher.prompt_queries if teacher is not None else None
            out = self.student(images, frozen.query, t, train=True, teacher_prompt_queries=prompt_queries)
            kd = self.student.kd
            if kd is None:
                loss = current_task_cross_entropy(out.logits, targets, classes)
            else:
                loss = kd.loss(out.features, out.logits, teacher.logits, targets, classes)
            losses.append(loss + out.prompt_loss)
        return losses

    def frozen_inputs(self, role: str, images: torch.Tensor, t: int) -> FrozenInputs:
        """What the frozen parts give a training step of `role` on `images`: one query pass shared by teacher
        and student (unless query="own"), and a frozen teacher's signal, all without autograd state."""
        with self._autocast():
            student_q, teacher_q = self._queries(images)
        if role == "teacher":
            return FrozenInputs(teacher_q)
        if self.teacher is None or self._joint(role):
            return FrozenInputs(student_q, teacher_q)
        # The frozen teacher selects its prompts as at inference (DualPrompt: by key, not by task id), as the
        # official code does and as it will when the student is evaluated.
        with torch.inference_mode(), self._autocast():
            signal = self._signal(self.teacher(images, teacher_q, t, train=False), len(images))
        # Copied out of inference mode: the student's loss saves the signal for its backward pass.
        return FrozenInputs(student_q, None, signal).map(lambda x: x.to(torch.float32, copy=True))

    def _signal(self, teacher_out: ModelOutput, batch: int) -> TeacherSignal:
        # The prompt queries need no detach here: the mapping detaches what it reads.
        needs_prompts = self.student.kd is not None and self.student.kd.params.needs_teacher_prompts
        prompt_queries = teacher_prompt_queries(teacher_out.prefixes, batch) if needs_prompts else None
        return TeacherSignal(teacher_out.logits.detach(), prompt_queries)

    def _precompute_frozen(self, role: str, task: TaskSplit) -> FrozenInputs:
        """Frozen outputs for every training image of `task`, in dataset order."""
        parts = []
        for images, _ in self._loader(task.train, self.cfg.train.eval_batch_size, shuffle=False):
            parts.append(self.frozen_inputs(role, images.to(self.device), task.task_id))
        return FrozenInputs.concat(parts)

    def _joint(self, role: str) -> bool:
        return role == "student" and self.teacher is not None and self.cfg.distill.schedule == "joint"

    def _autocast(self) -> AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _queries(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selection queries for (student, teacher): one frozen pass when they share the query backbone."""
        student_q = self.student_backbone.query(images)
        if self.teacher is None:
            return student_q, None
        teacher_q = self.teacher_backbone.query(images) if self.cfg.query == "own" else student_q
        return student_q, teacher_q

    def _teacher_loss(self, images, targets, t: int, classes: TaskClasses, query: torch.Tensor):
        out = self.teacher(images, query, t, train=True)
        return current_task_cross_entropy(out.logits, targets, classes) + out.prompt_loss, out

    # -- evaluation ---------------------------------------------------------------------------------------
    def _evaluate_splits(self, role: str, t: int) -> dict[str, list[float]]:
        splits = {"test": [self.stream.tasks[j].test for j in range(t + 1)]}
        if all(len(self.stream.tasks[j].val) for j in range(t + 1)):
            splits["val"] = [self.stream.tasks[j].val for j in range(t + 1)]
        return {name: [self.accuracy(role, ds, t) for ds in datasets] for name, datasets in splits.items()}

    @torch.inference_mode()
    def accuracy(self, role: str, dataset: Dataset, t: int) -> float:
        """Accuracy (%) of `role` after task t on `dataset`, predicting among all classes seen so far."""
        seen = self.stream.tasks[t].classes[-1] + 1
        model = self.teacher if role == "teacher" else self.student
        needs_teacher = role == "student" and model.kd is not None and model.kd.params.needs_teacher_prompts
        correct = total = 0
        for images, targets in self._loader(dataset, self.cfg.train.eval_batch_size, shuffle=False):
            images, targets = images.to(self.device), targets.to(self.device)
            with self._autocast():
                student_q, teacher_q = self._queries(images)
                if role == "teacher":
                    logits = self.teacher.predict(self.teacher(images, teacher_q, t, train=False))
                else:
                    prompts = (
                        teacher_prompt_queries(self.teacher(images, teacher_q, t, train=False).prefixes, len(images))
                        if needs_teacher else None
                    )
                    logits = self.student.predict(self.student(images, student_q, t, train=False, teacher_prompt_queries=prompts))
            correct += (logits[:, :seen].argmax(dim=1) == targets).sum().item()
            total += len(targets)
        return 100.0 * correct / max(total, 1)

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
        if self.teacher is not None and self.teacher_entry is None:
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
            self._restore_teacher(done)
        self.state = RunState(state["matrices"])
        self.completed_tasks = done

    def _restore_teacher(self, done: int) -> None:
        """The teacher after task `done - 1` from the store; tasks missing there (store pruned) are rebuilt."""
        if self.teacher_entry is None:
            raise ConfigError("this state has no teacher; load it into a run with the teacher store it was made with")
        if self._load_teacher(done - 1) is None:
            for t in range(done):
                self._teacher_task(self.stream.tasks[t])

