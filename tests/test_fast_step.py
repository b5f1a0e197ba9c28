"""The fast distillation step (issue 8): frozen parts without autograd state, one shared query pass, a frozen
teacher's outputs precomputed per task when augmentation is off, opt-in bf16 autocast and torch.compile —
each giving the training the same result as the plain way of computing it."""
from __future__ import annotations

import dataclasses
import shutil
import sysconfig

import pytest
import torch

from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.distill import TaskClasses
from cdl_core.learner import ContinualRun

BATCH = 8


def make_cfg(method="coda", kd="cdl_prompt", teacher=True, augment=False, epochs=2, schedule="sequential", **train):
    return RunConfig(
        data=DataConfig(name="synthetic", n_tasks=2, train_per_class=4, test_per_class=2, val_fraction=0.0, train_augment=augment),
        student=BackboneConfig("demo-s", "random"),
        teacher=BackboneConfig("demo-t", "random") if teacher else None,
        prompt=PromptConfig(method),
        distill=DistillConfig(kd if teacher else "none", schedule=schedule),
        train=TrainConfig(epochs=epochs, batch_size=BATCH, eval_batch_size=6, device="cpu", **train),
    )


def batch_of(run: ContinualRun, task_id: int = 0):
    task = run.stream.tasks[task_id]
    images = torch.stack([task.train[i][0] for i in range(BATCH)])
    targets = torch.tensor([task.train[i][1] for i in range(BATCH)])
    return images, targets, TaskClasses(past=task.classes[0], seen=task.classes[-1] + 1)


def started(run: ContinualRun, task_id: int = 0) -> ContinualRun:
    for model in (run.teacher, run.student):
        if model is not None:
            model.prompt.begin_task(task_id)
            model.train()
    return run


def trainable_state(run: ContinualRun) -> dict[str, torch.Tensor]:
    return run.student.trainable_state_dict()


# -- frozen parts: no autograd state, one query pass -----------------------------------------------------------

def test_frozen_inputs_are_plain_tensors_without_autograd_history():
    run = started(ContinualRun(make_cfg("coda", "cdl_prompt")))
    images, _, _ = batch_of(run)
    frozen = run.frozen_inputs("student", images, 0)
    tensors = [frozen.query, frozen.teacher.logits, *frozen.teacher.prompt_queries.values()]
    assert set(frozen.teacher.prompt_queries) == set(run.teacher.prompt.layers)
    for tensor in tensors:
        # computed under inference mode, copied out so the student's backward can save them
        assert not tensor.requires_grad and tensor.grad_fn is None and not tensor.is_inference()
        assert tensor.dtype == torch.float32 and len(tensor) == BATCH
    # the same values the teacher gives with autograd on
    query = run.student_backbone.query(images)
    out = run.teacher(images, query, 0, train=False)
    torch.testing.assert_close(frozen.teacher.logits, out.logits.detach())
    torch.testing.assert_close(frozen.query, query)


def test_one_query_pass_serves_teacher_and_student(monkeypatch):
    run = started(ContinualRun(make_cfg("coda", "cdl_prompt")))
    images, targets, classes = batch_of(run)
    passes = []
    for role, backbone in (("student", run.student_backbone), ("teacher", run.teacher_backbone)):
        original = backbone.query
        monkeypatch.setattr(backbone, "query", lambda x, original=original, role=role: passes.append(role) or original(x))
    run.losses("student", images, targets, 0, classes)
    assert passes == ["student"]

    own = started(ContinualRun(dataclasses.replace(make_cfg("coda", "cdl_prompt"), query="own")))
    passes.clear()
    for role, backbone in (("student", own.student_backbone), ("teacher", own.teacher_backbone)):
        original = backbone.query
        monkeypatch.setattr(backbone, "query", lambda x, original=original, role=role: passes.append(role) or original(x))
    own.losses("student", images, targets, 0, classes)
    assert sorted(passes) == ["student", "teacher"]


def test_teacher_forward_in_a_student_step_records_no_graph(monkeypatch):
    """The frozen teacher's forward runs under inference mode: nothing of it is kept for backward."""
    run = started(ContinualRun(make_cfg("l2p", "cdl_prompt")))
    images, targets, classes = batch_of(run)
    modes = []
    forward = run.teacher.forward

    def spy(*args, **kwargs):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(run.teacher, "forward", spy)
    (loss,) = run.losses("student", images, targets, 0, classes)
    assert modes == [(True, False)]
    loss.backward()
    assert all(p.grad is None for p in run.teacher.parameters())


# -- precomputed frozen outputs without augmentation ----------------------------------------------------------

@pytest.mark.parametrize("method,kd", [("coda", "cdl_prompt"), ("dualprompt", "kd"), ("l2p", "none")])
def test_precomputed_frozen_outputs_train_like_per_step_ones(monkeypatch, method, kd):
    """Without augmentation and with several epochs, the queries and the frozen teacher's outputs are computed
    once per task; training ends where computing them every step ends (up to float rounding), in far fewer
    frozen passes."""
    teacher = kd != "none"

    def train(precompute: bool) -> tuple[ContinualRun, list]:
        run = ContinualRun(make_cfg(method, kd, teacher=teacher, epochs=3))
        if not precompute:
            monkeypatch.setattr(run.frozen, "precompute", lambda role, batches, t, n: None)
        calls = []
        frozen_inputs = run.frozen.inputs
        monkeypatch.setattr(run.frozen, "inputs", lambda role, images, t: calls.append(len(images)) or frozen_inputs(role, images, t))
        run.run()
        return run, calls

    cached, cached_calls = train(True)
    per_step, per_step_calls = train(False)
    for key, value in trainable_state(per_step).items():
        torch.testing.assert_close(trainable_state(cached)[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
    assert cached.state.matrices == per_step.state.matrices
    # per phase: one pass over the task's images instead of one per step of every epoch
    images_per_task = sum(len(task.train) for task in cached.stream.tasks)
    phases = 2 if teacher else 1
    assert sum(cached_calls) == phases * images_per_task
    batch, drop_last = cached.cfg.train.batch_size, cached.cfg.train.drop_last
    stepped_per_task = sum(len(task.train) // batch * batch if drop_last else len(task.train) for task in cached.stream.tasks)
    assert sum(per_step_calls) == phases * 3 * stepped_per_task


def test_frozen_outputs_too_large_for_memory_are_computed_every_step(monkeypatch):
    """Past PRECOMPUTE_MAX_BYTES (a teacher's tapped blocks hold all its tokens) the task's frozen outputs are not
    kept: the run trains exactly as when computing them every step."""
    import cdl_core.frozen_inputs

    run = ContinualRun(make_cfg("l2p", "fitnets", teacher=True, epochs=2))
    batches = (images for images, _ in run.trainer.loader(run.stream.tasks[0].train, 256, shuffle=False))
    started(run)
    n = len(run.stream.tasks[0].train)
    per_image = sum(x[0].numel() * x.element_size() for x in cdl_core.frozen_inputs._leaves(run.frozen_inputs("student", batch_of(run)[0], 0)))
    monkeypatch.setattr(cdl_core.frozen_inputs, "PRECOMPUTE_MAX_BYTES", per_image * n - 1)
    assert run.frozen.precompute("student", batches, 0, n) is None
    monkeypatch.setattr(cdl_core.frozen_inputs, "PRECOMPUTE_MAX_BYTES", per_image * n)
    batches = (images for images, _ in run.trainer.loader(run.stream.tasks[0].train, 256, shuffle=False))
    assert len(run.frozen.precompute("student", batches, 0, n).query) == n


def test_no_precomputing_with_augmentation_or_a_single_epoch(monkeypatch):
    for cfg in (make_cfg(augment=True, epochs=2), make_cfg(augment=False, epochs=1)):
        run = ContinualRun(cfg)
        monkeypatch.setattr(run.frozen, "precompute", lambda role, batches, t, n: pytest.fail("precomputed with changing inputs"))
        run.run_task()


def test_joint_schedule_precomputes_queries_only():
    """A jointly trained teacher changes every step: only the queries can be precomputed."""
    run = ContinualRun(make_cfg("coda", "cdl_prompt", schedule="joint"))
    started(run)
    batches = (images for images, _ in run.trainer.loader(run.stream.tasks[0].train, 256, shuffle=False))
    frozen = run.frozen.precompute("student", batches, 0, len(run.stream.tasks[0].train))
    assert frozen.teacher is None and frozen.teacher_query is not None
    assert len(frozen.query) == len(run.stream.tasks[0].train)
    images, targets, classes = batch_of(run)
    index = torch.arange(BATCH)  # batch_of takes the task's first images, in order
    teacher_loss, student_loss = run.losses("student", images, targets, 0, classes, frozen.take(index))
    expected = run.losses("student", images, targets, 0, classes)
    torch.testing.assert_close(teacher_loss, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_loss, expected[1], rtol=1e-5, atol=1e-6)


# -- bf16 autocast and torch.compile ---------------------------------------------------------------------------

def test_precision_is_validated():
    with pytest.raises(ConfigError, match="train.precision='fp16' is not valid; choose one of: fp32, bf16"):
        make_cfg(precision="fp16").validate()


@pytest.mark.parametrize("method", ["coda", "l2p", "dualprompt"])
def test_bf16_autocast_step_is_close_to_fp32_on_cpu(method):
    fp32 = started(ContinualRun(make_cfg(method, "cdl_prompt")))
    bf16 = started(ContinualRun(make_cfg(method, "cdl_prompt", precision="bf16")))
    images, targets, classes = batch_of(fp32)
    (want,) = fp32.losses("student", images, targets, 0, classes)
    (got,) = bf16.losses("student", images, targets, 0, classes)
    assert got.dtype == torch.float32  # losses reduce in float32 under autocast
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    assert got.item() != want.item()  # autocast really ran in bf16
    want.backward()
    got.backward()
    for (name, p), q in zip(fp32.student.named_parameters(), bf16.student.parameters()):
        if p.grad is not None:
            assert q.grad is not None and q.grad.dtype == torch.float32, name
            cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
            assert cosine > 0.98, f"{name}: bf16 gradient direction off ({cosine:.3f})"


def test_bf16_run_trains_and_evaluates_end_to_end():
    run = ContinualRun(make_cfg("coda", "cdl_prompt", precision="bf16", epochs=1))
    results = run.run()
    matrix = results["matrices"]["student"]["test"]
    assert len(matrix) == 2 and all(0.0 <= acc <= 100.0 for row in matrix for acc in row)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc") or shutil.which("gcc")),
                    reason="torch.compile on CPU needs a C compiler")
def test_compiled_step_gives_the_eager_loss_and_gradients():
    eager = started(ContinualRun(make_cfg("coda", "cdl_prompt")))
    compiled = started(ContinualRun(make_cfg("coda", "cdl_prompt", compile=True)))
    assert compiled.student_backbone._compiled is not None and eager.student_backbone._compiled is None
    images, targets, classes = batch_of(eager)
    for _ in range(2):  # the second call runs the compiled graph, not the trace
        (want,) = eager.losses("student", images, targets, 0, classes)
        (got,) = compiled.losses("student", images, targets, 0, classes)
        eager.student.zero_grad(set_to_none=True)
        compiled.student.zero_grad(set_to_none=True)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(eager.student.named_parameters(), compiled.student.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_cli_flags_set_precision_and_compile():
    from cdl_core import run as cli

    cfg = cli.config_from_args(cli.build_parser().parse_args(["--precision", "bf16", "--compile"]))
    assert cfg.train.precision == "bf16" and cfg.train.compile is True
    default = cli.config_from_args(cli.build_parser().parse_args([]))
    assert default.train.precision == "fp32" and default.train.compile is False
