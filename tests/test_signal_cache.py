"""The frozen-signal cache: the first student of a stored teacher stores its queries and teacher logits per task and
epoch, the others read them, and every one of them trains bit for bit as a student that computes them online."""
import contextlib
import logging
import threading

import pytest
import torch

from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.frozen_inputs import FrozenPasses
from cdl_core.learner import ContinualRun, teacher_key
from cdl_core.signal_plan import signal_cache_plan
from cdl_core.teacher_store import TeacherStore


def make_cfg(kd="kd", method="coda", augment=True, max_gb=8.0, **distill):
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=2, train_per_class=2, test_per_class=1, val_fraction=0.0, train_augment=augment),
        student=BackboneConfig("demo-s", "random"), teacher=BackboneConfig("demo-t", "random"),
        prompt=PromptConfig(method), distill=DistillConfig(kd, **distill),
        train=TrainConfig(epochs=2, batch_size=4, eval_batch_size=16, device="cpu", drop_last=False, signal_cache_max_gb=max_gb),
    )


def student_run(cfg, store):
    torch.manual_seed(0)  # random-weight backbones follow the global RNG (tests/test_teacher_student.py)
    run = ContinualRun(cfg, teacher_store=store)
    return run, run.run()


def same_student(a: ContinualRun, b: ContinualRun) -> bool:
    sa, sb = a.student.trainable_state_dict(), b.student.trainable_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_frozen_passes(monkeypatch) -> dict[str, int]:
    calls = {"teacher_signal": 0}
    signal = FrozenPasses.teacher_signal

    def counting(self, *args, **kwargs):
        calls["teacher_signal"] += 1
        return signal(self, *args, **kwargs)

    monkeypatch.setattr(FrozenPasses, "teacher_signal", counting)
    return calls


@pytest.mark.parametrize("kd", ["kd", "dcdl"])
def test_students_from_the_cache_equal_a_student_computing_online(tmp_path, monkeypatch, kd):
    store = tmp_path / "teachers"
    first, first_results = student_run(make_cfg(kd), store)  # trains the teacher, computes and stores the signals
    assert first.trainer.signals.computed == [0, 1]
    calls = count_frozen_passes(monkeypatch)
    second, second_results = student_run(make_cfg(kd), store)  # reads them: no teacher pass while training
    assert second.trainer.signals.computed == [] and calls["teacher_signal"] == 0
    online, online_results = student_run(make_cfg(kd, max_gb=0), store)  # the same teacher, signals computed online
    assert online.trainer.signals is None and calls["teacher_signal"] > 0
    assert same_student(first, online) and same_student(second, online)
    assert first_results["matrices"] == second_results["matrices"] == online_results["matrices"]
    entry = TeacherStore(store).entry(teacher_key(make_cfg(kd)))
    stored = sorted(info.base_name for info in entry.files() if info.base_name.startswith("signals_"))
    assert len(stored) == 4 and all(entry.has_file(name[:-3]) for name in stored if name.endswith(".pt"))
    tensors, record = entry.load_file(stored[0][:-5])  # task 0's: both epochs, every image, its 5 classes
    assert record["epochs"] == 2 and tensors["logits"].shape == (2, 10, 5) and tensors["queries"].shape[:2] == (2, 10)
    assert not tensors["logits"].isnan().any() and not torch.equal(tensors["queries"][0], tensors["queries"][1])


def test_a_corrupted_signal_file_is_computed_again(tmp_path, caplog):
    store = tmp_path / "teachers"
    first, _ = student_run(make_cfg(), store)
    entry = TeacherStore(store).entry(teacher_key(make_cfg()))
    stem = first.trainer.signals.stem(1)
    path = tmp_path / "teachers" / entry.key / f"{stem}.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes: only the checksum tells
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        second, _ = student_run(make_cfg(), store)
    assert "fails its checksum" in caplog.text and second.trainer.signals.computed == [1]
    assert same_student(first, second)


def test_without_augmentation_one_epoch_of_signals_serves_every_epoch(tmp_path):
    store = tmp_path / "teachers"
    first, _ = student_run(make_cfg(augment=False), store)
    second, _ = student_run(make_cfg(augment=False), store)
    online, _ = student_run(make_cfg(augment=False, max_gb=0), store)
    tensors, _ = TeacherStore(store).entry(teacher_key(make_cfg(augment=False))).load_file(first.trainer.signals.stem(0))
    assert tensors["logits"].shape[0] == 1
    assert same_student(first, second)
    # online, the no-augmentation path precomputes with evaluation-size batches: equal up to float rounding
    for key, value in online.student.trainable_state_dict().items():
        torch.testing.assert_close(first.student.trainable_state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_what_reads_more_than_logits_computes_online_and_says_why():
    reasons = {kd: signal_cache_plan(make_cfg(kd).validate()).online_because for kd in ("kd", "dkd", "deit", "dcdl", "fitnets", "reviewkd", "cdl_prompt")}
    assert {kd for kd, why in reasons.items() if why is None} == {"kd", "dkd", "deit", "dcdl"}
    assert "block outputs" in reasons["fitnets"] and "block outputs" in reasons["reviewkd"] and "prompts" in reasons["cdl_prompt"]
    assert "joint" in signal_cache_plan(make_cfg(schedule="joint").validate()).online_because
    own = make_cfg()
    own.query = "own"
    assert "own" in signal_cache_plan(own.validate()).online_because


def test_the_cache_size_is_images_epochs_and_task_logits_plus_query_in_float32():
    cfg = RunConfig.from_dict({
        "data": {"name": "cifar100"}, "student": {"preset": "vit_small_patch16_224"}, "teacher": {"preset": "vit_base_patch16_224"},
        "prompt": {"method": "coda"}, "distill": {"method": "kd"}, "train": {"epochs": 20},
    }).validate()
    assert signal_cache_plan(cfg).nbytes == 50_000 * 20 * (100 // 10 + 384) * 4  # all training images (official: no val split)
    apt = RunConfig.from_dict(cfg.to_dict() | {"prompt": {"method": "apt"}}).validate()
    assert signal_cache_plan(apt).nbytes == 50_000 * 20 * 10 * 4  # APT selects nothing: logits only
    capped = RunConfig.from_dict(cfg.to_dict() | {"train": cfg.to_dict()["train"] | {"signal_cache_max_gb": 1.0}}).validate()
    assert "over train.signal_cache_max_gb=1" in signal_cache_plan(capped).online_because


def test_a_cache_over_the_cap_trains_online(tmp_path):
    run, _ = student_run(make_cfg(max_gb=1e-9), tmp_path / "teachers")
    assert run.trainer.signals is None
    assert not any(p.name.startswith("signals_") for p in (tmp_path / "teachers").rglob("*"))


def test_a_negative_cap_is_refused():
    with pytest.raises(ConfigError, match="signal_cache_max_gb=-1 must be >= 0"):
        make_cfg(max_gb=-1).validate()


def test_students_sharing_a_lock_compute_each_tasks_signals_once(tmp_path):
    """Two students of one stored teacher at once, the lease a process-wide lock per name (the orchestrator's is a
    cluster-wide lease with the same contract): each task's signals are computed by one of them and read by the other."""
    store = tmp_path / "teachers"
    student_run(make_cfg(max_gb=0), store)  # the teacher, stored
    locks: dict[str, threading.Lock] = {}
    guard = threading.Lock()

    @contextlib.contextmanager
    def lease(name):
        with guard:
            lock = locks.setdefault(name, threading.Lock())
        with lock:
            yield

    runs = []
    for _ in range(2):  # built here: random weights follow the global RNG, which threads would share
        torch.manual_seed(0)
        runs.append(ContinualRun(make_cfg(), teacher_store=store, teacher_lock=lease))
    threads = [threading.Thread(target=run.run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 2 and sorted(runs[0].trainer.signals.computed + runs[1].trainer.signals.computed) == [0, 1]
    # (not compared with each other: threads of one process share torch's RNG, which each phase seeds; trials are
    # processes, and the sequential test above compares students bit for bit)
    assert any(name.endswith(runs[0].trainer.signals.stem(0)) for name in locks)


def test_evaluation_computes_each_splits_queries_once_per_run(monkeypatch):
    """A task's test images are evaluated after every later task; their (frozen, unaugmented) queries are computed
    at the first evaluation only, and the accuracies are those of computing them every time."""
    calls = []
    queries = FrozenPasses.queries

    def counting(self, images):
        calls.append(len(images))
        return queries(self, images)

    cfg = make_cfg(max_gb=0)
    torch.manual_seed(0)
    memo = ContinualRun(cfg).run()
    monkeypatch.setattr(FrozenPasses, "queries", counting)
    torch.manual_seed(0)
    run = ContinualRun(cfg)
    run.evaluator._queries = _Forgetful()  # every evaluation computes its queries
    forgetful = run.run()
    assert forgetful["matrices"] == memo["matrices"]
    recomputed = len(calls)
    calls.clear()
    torch.manual_seed(0)
    ContinualRun(cfg).run()
    n_tasks = len(run.stream.tasks)  # each test split is one batch (5 images)
    evaluations = 2 * sum(n_tasks - t for t in range(n_tasks))  # teacher and student evaluate task t after tasks t..T-1
    assert recomputed - len(calls) == evaluations - n_tasks  # training's query calls cancel; each split queried once


class _Forgetful(dict):
    def __setitem__(self, key, value) -> None:
        pass
