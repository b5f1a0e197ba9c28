"""Where a run's teacher after each task comes from: trained here, loaded from a teacher store (trained and stored
when it is not there yet), or trained jointly with its student (inside the student's phase)."""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Callable

from cdl_core.data import TaskSplit
from cdl_core.errors import ConfigError, TeacherStoreError
from cdl_core.model import ContinualModel
from cdl_core.teacher_store import TeacherEntry

log = logging.getLogger(__name__)

Rows = dict[str, list[float]]  # split -> accuracies on tasks 0..t


class TeacherSource:
    """`before_student(task)`: the teacher's accuracy rows after `task` and whether it was trained here (None,
    None when it trains with its student); `restore(done)`: the teacher as after task `done - 1` when a run resumes."""

    stored = False  # its state lives in a teacher store (not in the run's checkpoints)

    def __init__(self, teacher: ContinualModel, train: Callable[[TaskSplit], None], evaluate: Callable[[int], Rows]) -> None:
        self.teacher = teacher
        self.train = train
        self.evaluate = evaluate

    def before_student(self, task: TaskSplit) -> tuple[Rows | None, bool | None]:
        self.train(task)
        return self.evaluate(task.task_id), True

    def restore(self, done: int, tasks: list[TaskSplit]) -> None:
        raise ConfigError("this state has no teacher; load it into a run with the teacher store it was made with")


class JointTeacher(TeacherSource):
    """Trained inside the student's phase, batch by batch (the joint schedule): nothing happens before it."""

    def before_student(self, task: TaskSplit) -> tuple[Rows | None, bool | None]:
        return None, None


class StoredTeacher(TeacherSource):
    """Loaded task by task from a teacher store entry; a task not stored yet is trained under `lock` (so processes
    sharing the store train it once) and stored."""

    stored = True

    def __init__(
        self, teacher: ContinualModel, train: Callable[[TaskSplit], None], evaluate: Callable[[int], Rows],
        entry: TeacherEntry, identity: dict, facts: dict[str, str],
        lock: Callable[[str], AbstractContextManager], require: bool,
    ) -> None:
        super().__init__(teacher, train, evaluate)
        self.entry, self.identity, self.facts, self.lock, self.require = entry, identity, facts, lock, require
        self.wait_seconds = 0.0  # time spent waiting for another process to train a shared teacher task

    def before_student(self, task: TaskSplit) -> tuple[Rows, bool]:
        t, entry = task.task_id, self.entry
        rows = self.load(t)
        if rows is not None:
            return rows, False
        if self.require:
            entry.load(t)  # raises the clear "no stored task" error
        waiting = time.perf_counter()
        with self.lock(f"{entry.key}/task_{t}"):
            self.wait_seconds += time.perf_counter() - waiting
            rows = self.load(t)  # another process may have stored it while this one waited
            if rows is not None:
                return rows, False
            start = time.perf_counter()
            self.train(task)
            rows = self.evaluate(t)
            entry.save(t, self.teacher.trainable_state_dict(), rows, self.identity, self.facts, time.perf_counter() - start)
        log.info("teacher task %d trained and stored as %s", t, entry)
        return rows, True

    def load(self, t: int) -> Rows | None:
        """Load the stored teacher state after task `t`; None when it is not stored or fails its checksum."""
        if not self.entry.has(t):
            return None
        try:
            state, record = self.entry.load(t)
        except TeacherStoreError as err:
            if self.require:
                raise
            log.warning("%s; training that task again", err)
            return None
        self.teacher.prompt.begin_task(t)
        self.teacher.load_trainable_state_dict(state)
        log.info("teacher task %d loaded from %s", t, self.entry)
        return record["rows"]

    def restore(self, done: int, tasks: list[TaskSplit]) -> None:
        """The teacher after task `done - 1`; tasks missing from the store (pruned) are rebuilt."""
        if self.load(done - 1) is None:
            for task in tasks[:done]:
                self.before_student(task)
