"""Teacher -> student training with cdl_core.learner.ContinualRun: gradient flow in a student step, both
schedules, tiny synthetic runs of every KD method and prompt method, the teacher store, rejected
combinations, and the `python -m cdl_core.run` CLI in-process."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from cdl_core import run as cli
from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.distill import TaskClasses
from cdl_core.training import PhaseTrainer
from cdl_core.learner import ContinualRun, teacher_identity, teacher_key
from cdl_core.teacher_store import TeacherStore, TeacherStoreError

N_TASKS, CLASSES_PER_TASK, TRAIN_PER_CLASS, TEST_PER_CLASS = 2, 5, 1, 1
BATCH = CLASSES_PER_TASK * TRAIN_PER_CLASS  # one step per task


def make_cfg(method="coda", kd="cdl_prompt", schedule="sequential", teacher=True, prompt_params=None, **distill):
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=N_TASKS, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS, val_fraction=0.0),
        student=BackboneConfig("demo-s", "random"),
        teacher=BackboneConfig("demo-t", "random") if teacher else None,
        prompt=PromptConfig(method, dict(prompt_params or {})),
        distill=DistillConfig(kd, schedule=schedule, **distill),
        train=TrainConfig(batch_size=BATCH, eval_batch_size=16, device="cpu"),
    )


def first_batch(run: ContinualRun, task_id: int = 0):
    task = run.stream.tasks[task_id]
    images, targets = next(iter(DataLoader(task.train, batch_size=BATCH)))
    return images, targets, TaskClasses(past=task.classes[0], seen=task.classes[-1] + 1)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def grad_sum(module: torch.nn.Module, prefix: str) -> float:
    return sum(p.grad.abs().sum().item() for n, p in module.named_parameters() if n.startswith(prefix) and p.grad is not None)


# -- gradient flow -------------------------------------------------------------------------------------------

STUDENT_TRAINABLE = {
    "cdl_prompt": ("prompt.", "head.", "kd.mapping.", "kd.kd_head."),
    "kd": ("prompt.", "head."),
    "dkd": ("prompt.", "head."),
}


@pytest.mark.parametrize("kd", ["cdl_prompt", "kd", "dkd"])
def test_student_step_gradients_reach_only_student_prompts_heads_and_mapping(kd):
    run = ContinualRun(make_cfg("coda", kd))
    run.teacher.prompt.begin_task(0)  # as after the teacher's phase of task 0
    run.student.prompt.begin_task(0)
    run.student.train()
    images, targets, classes = first_batch(run)
    teacher_before, student_before = snapshot(run.teacher), snapshot(run.student)

    losses = run.losses("student", images, targets, 0, classes)
    assert len(losses) == 1
    losses[0].backward()

    assert all(p.grad is None for p in run.teacher.parameters())
    for name, p in run.student.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert name.startswith(STUDENT_TRAINABLE[kd]), f"unexpected trainable student parameter {name}"
    for prefix in STUDENT_TRAINABLE[kd]:
        assert grad_sum(run.student, prefix) > 0, f"no gradient reached {prefix}"
    if kd == "cdl_prompt":
        mapping = run.student.kd.mapping
        for store in (mapping.keys, mapping.attention, mapping.components):
            for layer in run.teacher.prompt.layers:
                assert store[str(layer)].grad[: mapping.active].abs().sum() > 0, f"mapping layer {layer}"

    optimizer, _ = run.trainer.optimizer(run.student)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer.isdisjoint(id(p) for p in run.teacher.parameters())
    assert in_optimizer.isdisjoint(id(p) for p in run.student.backbone.parameters())
    optimizer.step()
    assert changed(teacher_before, run.teacher) == set()
    moved = changed(student_before, run.student)
    assert not any(k.startswith("backbone.") for k in moved)
    for prefix in STUDENT_TRAINABLE[kd]:
        assert any(k.startswith(prefix) for k in moved), f"{prefix} did not change in the step"


def test_student_training_phase_leaves_teacher_and_backbones_unchanged():
    run = ContinualRun(make_cfg("coda", "cdl_prompt"))
    run.teacher.prompt.begin_task(0)
    teacher_before, student_before = snapshot(run.teacher), snapshot(run.student)
    run.trainer.train_phase("student", run.stream.tasks[0])
    assert changed(teacher_before, run.teacher) == set()
    moved = changed(student_before, run.student)
    assert not any(k.startswith("backbone.") for k in moved)
    for prefix in ("prompt.", "head.", "kd.mapping.", "kd.kd_head."):
        assert any(k.startswith(prefix) for k in moved), prefix


def test_joint_schedule_trains_teacher_but_not_from_student_loss():
    run = ContinualRun(make_cfg("coda", "cdl_prompt", schedule="joint"))
    for model in (run.teacher, run.student):
        model.prompt.begin_task(0)
        model.train()
    images, targets, classes = first_batch(run)
    teacher_loss, student_loss = run.losses("student", images, targets, 0, classes)
    teacher_params = [p for p in run.teacher.parameters() if p.requires_grad]
    from_student = torch.autograd.grad(student_loss, teacher_params, allow_unused=True, retain_graph=True)
    assert all(g is None or g.abs().sum() == 0 for g in from_student)
    from_teacher = torch.autograd.grad(teacher_loss, teacher_params, allow_unused=True)
    assert sum(g.abs().sum().item() for g in from_teacher if g is not None) > 0
    # the teacher's loss is its own CE + prompt loss, whatever the student does
    (alone,) = run.losses("teacher", images, targets, 0, classes)
    torch.testing.assert_close(teacher_loss, alone)

    run = ContinualRun(make_cfg("coda", "cdl_prompt", schedule="joint"))
    teacher_before, student_before = snapshot(run.teacher), snapshot(run.student)
    run.trainer.train_phase("student", run.stream.tasks[0])  # the joint phase steps both
    teacher_moved = changed(teacher_before, run.teacher)
    assert any(k.startswith("prompt.") for k in teacher_moved) and any(k.startswith("head.") for k in teacher_moved)
    assert not any(k.startswith("backbone.") for k in teacher_moved)
    assert any(k.startswith("kd.mapping.") for k in changed(student_before, run.student))


# -- tiny end-to-end runs ------------------------------------------------------------------------------------


def check_matrices(results, roles=("student", "teacher")):
    step = 100.0 / (CLASSES_PER_TASK * TEST_PER_CLASS)  # accuracies on 5 test images are multiples of 20%
    assert results["completed_tasks"] == N_TASKS
    for role in roles:
        matrix = results["matrices"][role]["test"]
        assert [len(row) for row in matrix] == list(range(1, N_TASKS + 1)), role
        for row in matrix:
            for value in row:
                assert 0.0 <= value <= 100.0
                assert abs(value / step - round(value / step)) < 1e-9
        for name in ("final_avg_acc", "avg_incremental_acc", "forgetting"):
            assert f"{role}_test_{name}" in results["summary"]
        final = results["summary"][f"{role}_test_final_avg_acc"]
        assert abs(final - sum(matrix[-1]) / N_TASKS) < 1e-9


@pytest.mark.parametrize(
    "method, kd",
    [("coda", "kd"), ("coda", "dkd"), ("l2p", "cdl_prompt"), ("dualprompt", "cdl_prompt")],
)
def test_tiny_sequential_run_produces_student_and_teacher_matrices(method, kd):
    # (coda, cdl_prompt) in the sequential schedule: the `stored_teacher` run below
    results = ContinualRun(make_cfg(method, kd)).run()
    check_matrices(results)
    assert results["config"]["distill"]["method"] == kd and results["config"]["prompt"]["method"] == method


def test_tiny_joint_run_produces_student_and_teacher_matrices():
    reports = []
    results = ContinualRun(make_cfg("coda", "cdl_prompt", schedule="joint")).run(on_task=reports.append)
    check_matrices(results)
    assert [set(r.rows) for r in reports] == [{"student", "teacher"}] * N_TASKS


# -- the teacher store ---------------------------------------------------------------------------------------


def test_random_backbone_weights_do_not_depend_on_global_rng_state():
    """Two runs of one config must get the same random backbones: otherwise a stored teacher cannot be reused
    in the same process, and the CLI's "student alone" baseline gets a different backbone than the student."""
    torch.manual_seed(1)
    first = ContinualRun(make_cfg("coda", "kd"))
    torch.manual_seed(2)
    second = ContinualRun(make_cfg("coda", "kd"))
    assert first.student_backbone.weights_sha256 == second.student_backbone.weights_sha256
    assert first.teacher_backbone.weights_sha256 == second.teacher_backbone.weights_sha256
    assert first.teacher_facts() == second.teacher_facts()


def seeded_run(cfg, **kw) -> ContinualRun:
    # Pin the global RNG before construction: random-weight backbones currently depend on it (see the test above),
    # and these tests are about the store, not that.
    torch.manual_seed(0)
    return ContinualRun(cfg, **kw)


@pytest.fixture(scope="module")
def stored_teacher(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests that compare against this run (results depend on it)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CDL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
            directory = tmp_path_factory.mktemp("teachers")
            cfg = make_cfg("coda", "cdl_prompt")
            run = seeded_run(cfg, teacher_store=directory)
            reports = []
            results = run.run(on_task=reports.append)
    finally:
        torch.set_num_threads(threads)
    return dict(
        dir=directory, key=teacher_key(cfg), results=results, reports=reports, student=run.student.trainable_state_dict(),
        teacher=run.teacher.trainable_state_dict(),
    )


def forbid_teacher_training(monkeypatch):
    train_phase = PhaseTrainer.train_phase

    def guarded(self, role, task):
        if role == "teacher":
            raise AssertionError("the teacher was trained although it is stored")
        return train_phase(self, role, task)

    monkeypatch.setattr(PhaseTrainer, "train_phase", guarded)


def test_a_teacher_run_stores_each_task_under_the_teacher_key(stored_teacher):
    check_matrices(stored_teacher["results"])  # also the tiny sequential coda + cdl_prompt run
    assert [r.teacher_trained for r in stored_teacher["reports"]] == [True] * N_TASKS
    assert [p.name for p in stored_teacher["dir"].iterdir()] == [stored_teacher["key"]]
    entry_dir = stored_teacher["dir"] / stored_teacher["key"]
    assert sorted(p.name for p in entry_dir.iterdir()) == ["task_0.json", "task_0.pt", "task_1.json", "task_1.pt", "teacher.json"]
    manifest = json.loads((entry_dir / "teacher.json").read_text())
    assert manifest["identity"] == json.loads(json.dumps(teacher_identity(make_cfg("coda", "cdl_prompt"))))
    entry = TeacherStore(stored_teacher["dir"]).entry(stored_teacher["key"])
    assert entry.matrix("test") == stored_teacher["results"]["matrices"]["teacher"]["test"]
    last, record = entry.load(1)
    assert record["sha256"] == hashlib.sha256((entry_dir / "task_1.pt").read_bytes()).hexdigest()
    assert set(last) == set(stored_teacher["teacher"])
    assert all(torch.equal(last[k], v) for k, v in stored_teacher["teacher"].items())
    assert not any(k.startswith("backbone.") for k in last)


def test_stored_teacher_is_loaded_not_trained_and_student_is_bit_identical(stored_teacher, monkeypatch):
    forbid_teacher_training(monkeypatch)
    run = seeded_run(make_cfg("coda", "cdl_prompt"), teacher_store=stored_teacher["dir"], require_teacher=True)
    reports = []
    results = run.run(on_task=reports.append)
    assert [r.teacher_trained for r in reports] == [False] * N_TASKS
    assert results["matrices"] == stored_teacher["results"]["matrices"]
    student = run.student.trainable_state_dict()
    assert set(student) == set(stored_teacher["student"])
    for key, value in stored_teacher["student"].items():
        assert torch.equal(student[key], value), key
    for key, value in stored_teacher["teacher"].items():
        assert torch.equal(run.teacher.trainable_state_dict()[key], value), key


def test_a_teacher_partly_stored_is_loaded_then_trained_on_and_matches_a_fresh_run(stored_teacher, tmp_path):
    """Task 0 from the store, task 1 trained here: the same teacher and student as the run that trained both."""
    shutil.copytree(stored_teacher["dir"], tmp_path / "store")
    entry_dir = tmp_path / "store" / stored_teacher["key"]
    (entry_dir / "task_1.json").unlink()  # task 1 uncommitted, as if its writer had been killed
    run = seeded_run(make_cfg("coda", "cdl_prompt"), teacher_store=tmp_path / "store")
    reports = []
    results = run.run(on_task=reports.append)
    assert [r.teacher_trained for r in reports] == [False, True]
    assert results["matrices"] == stored_teacher["results"]["matrices"]
    assert (entry_dir / "task_1.json").is_file()
    for key, value in stored_teacher["teacher"].items():
        assert torch.equal(run.teacher.trainable_state_dict()[key], value), key


@pytest.mark.parametrize("store_pruned", [False, True], ids=["teacher-from-store", "store-pruned-teacher-rebuilt"])
def test_a_resumed_run_takes_its_teacher_from_the_store_not_from_its_own_checkpoint(stored_teacher, tmp_path, store_pruned):
    """What a restarted trial does: its checkpoint holds only the student; the teacher comes back from the
    store (or is retrained into it when the store lost it), and the run ends as the uninterrupted one."""
    shutil.copytree(stored_teacher["dir"], tmp_path / "store")
    first = seeded_run(make_cfg("coda", "cdl_prompt"), teacher_store=tmp_path / "store")
    first.run_task()
    state = first.state_dict()
    assert "teacher" not in state and "student" in state
    if store_pruned:
        TeacherStore(tmp_path / "store").remove(stored_teacher["key"])
    resumed = seeded_run(make_cfg("coda", "cdl_prompt"), teacher_store=tmp_path / "store")
    resumed.load_state_dict(state)
    results = resumed.run()
    assert results["matrices"] == stored_teacher["results"]["matrices"]
    for key, value in stored_teacher["teacher"].items():
        assert torch.equal(resumed.teacher.trainable_state_dict()[key], value), key
    assert TeacherStore(tmp_path / "store").entry(stored_teacher["key"]).committed() == [0, 1]


def test_student_only_settings_reuse_the_stored_teacher(stored_teacher, monkeypatch):
    forbid_teacher_training(monkeypatch)
    cfg = make_cfg("coda", "dkd", alpha=0.9, temperature=4.0)
    assert teacher_key(cfg) == stored_teacher["key"]
    report = seeded_run(cfg, teacher_store=stored_teacher["dir"], require_teacher=True).run_task()
    assert report.rows["teacher"]["test"] == stored_teacher["results"]["matrices"]["teacher"]["test"][0]


def with_lr(cfg, lr):
    cfg.train.lr = lr
    return cfg


@pytest.mark.parametrize(
    "cfg",
    [make_cfg("coda", "cdl_prompt", prompt_params={"pool_size": 20}), make_cfg("l2p", "cdl_prompt"), with_lr(make_cfg(), 5e-3)],
    ids=["prompt-params", "prompt-method", "lr"],
)
def test_a_teacher_that_differs_is_not_served_from_another_entry(stored_teacher, monkeypatch, cfg):
    forbid_teacher_training(monkeypatch)
    assert teacher_key(cfg) != stored_teacher["key"]
    run = seeded_run(cfg, teacher_store=stored_teacher["dir"], require_teacher=True)
    with pytest.raises(TeacherStoreError, match=f"teacher {teacher_key(cfg)} in .* has no stored task 0"):
        run.run_task()


def test_require_teacher_with_an_empty_store_gives_clear_error(tmp_path, monkeypatch):
    forbid_teacher_training(monkeypatch)
    run = ContinualRun(make_cfg("coda", "cdl_prompt"), teacher_store=tmp_path / "empty", require_teacher=True)
    with pytest.raises(TeacherStoreError, match="has no stored task 0; train the teacher first"):
        run.run_task()
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize(
    "cfg, kwargs, match",
    [
        (make_cfg("coda", "cdl_prompt", schedule="joint"), {"teacher_store": "T"}, "sequential"),
        (make_cfg("coda", "none", teacher=False), {"teacher_store": "T"}, "needs a teacher"),
        (make_cfg("coda", "cdl_prompt"), {"require_teacher": True}, "require_teacher needs a teacher store"),
    ],
)
def test_teacher_store_misuse_is_rejected(cfg, kwargs, match, tmp_path):
    if "teacher_store" in kwargs:
        kwargs = dict(kwargs, teacher_store=tmp_path / "t")
    with pytest.raises(ConfigError, match=match):
        ContinualRun(cfg, **kwargs)
    assert not (tmp_path / "t").exists()


# -- rejected combinations ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kd", ["kd", "dkd", "cdl_prompt"])
def test_distillation_without_teacher_is_rejected(kd):
    with pytest.raises(ConfigError, match=f"distill.method='{kd}' needs a teacher"):
        make_cfg("coda", kd, teacher=False).validate()


def test_cdl_prompt_without_prompts_is_rejected_but_logit_kd_is_allowed():
    with pytest.raises(ConfigError, match="prompt.method='none'"):
        make_cfg("none", "cdl_prompt").validate()
    for kd in ("kd", "dkd"):
        make_cfg("none", kd).validate()


# -- CLI -------------------------------------------------------------------------------------------------------

SMALL = [
    "--dataset", "synthetic", "--student", "demo-s", "--student-weights", "random", "--n-tasks", str(N_TASKS),
    "--train-per-class", str(TRAIN_PER_CLASS), "--test-per-class", str(TEST_PER_CLASS), "--batch-size", str(BATCH), "--epochs", "1",
    "--device", "cpu", "--quiet",
]
TEACHER = ["--teacher", "demo-t", "--teacher-weights", "random"]


def test_cli_kd_without_teacher_exits_2(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main([*SMALL, "--kd", "cdl_prompt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "needs a teacher" in err
    assert not out.exists()


@pytest.mark.parametrize(("teacher_store", "message"), [("empty_dir", "has no stored task 0"), ("", "store location is empty")])
def test_cli_require_teacher_with_empty_teacher_store_exits_2(teacher_store, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if teacher_store:
        (tmp_path / teacher_store).mkdir()
    out = tmp_path / "r.json"
    forbid_teacher_training(monkeypatch)
    code = cli.main([*SMALL, *TEACHER, "--teacher-store", teacher_store, "--require-teacher", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not out.exists()


def test_cli_require_teacher_without_teacher_store_exits_2(tmp_path, capsys):
    assert cli.main([*SMALL, *TEACHER, "--require-teacher", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_cli_teacher_student_run_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    assert cli.main([*SMALL, *TEACHER, "--method", "l2p", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model") and "final avg acc" in line)
    names = [line.split("  ")[0].strip() for line in lines[header + 1 : header + 4]]
    assert names == ["teacher (demo-t, l2p)", "student alone (demo-s)", "student + cdl_prompt (demo-s)"]
    data = json.loads(out.read_text())
    assert set(data["runs"]) == {"distilled", "student_alone"}
    distilled, alone = data["runs"]["distilled"], data["runs"]["student_alone"]
    assert distilled["config"]["distill"]["method"] == "cdl_prompt" and distilled["config"]["teacher"]["preset"] == "demo-t"
    assert alone["config"]["teacher"] is None and alone["config"]["distill"]["method"] == "none"
    assert set(distilled["matrices"]) == {"student", "teacher"} and set(alone["matrices"]) == {"student"}
    for results, roles in ((distilled, ("student", "teacher")), (alone, ("student",))):
        check_matrices(results, roles)
    # the table rows show the final average accuracies of the JSON
    row = next(line for line in lines[header + 1 :] if line.startswith("student + cdl_prompt"))
    assert f"{distilled['summary']['student_test_final_avg_acc']:.2f}" in row
    assert f"results written to {out}" in stdout
