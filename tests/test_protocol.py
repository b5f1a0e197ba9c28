"""The `official` protocol against independent computations written from DESIGN.md section 2's formulas: the lr of
each epoch, a known pixel through each input scaling, DKD at its own temperature, the prediction weighting, dropped
last batches; and the protocol's fields as a config records them (explicit values win, the teacher key follows
what changes a teacher's training, pretrained tags are selectable)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cdl_core import run as run_cli
from cdl_core.backbones import create_backbone
from cdl_core.catalog.prompts import resolve_prompt_params
from cdl_core.catalog.protocols import OFFICIAL, PROTOCOLS, TIMM
from cdl_core.config import BackboneConfig, ConfigError, DataConfig, DistillConfig, RunConfig
from cdl_core.data import build_stream
from cdl_core.attach import Attachment, ModelOutput
from cdl_core.distill import KDContext, TaskClasses, TeacherSignal, build_kd_method
from cdl_core.errors import WeightsUnavailableError
from cdl_core.learner import ContinualRun
from cdl_core.lr_schedules import build_lr_schedule
from cdl_core.teacher_identity import teacher_key
from orchestrator.errors import SpaceError
from orchestrator.space import SweepSpace, load_space

TINY_SYNTHETIC = {"name": "synthetic", "n_tasks": 5, "train_per_class": 10, "test_per_class": 4, "train_augment": False}


def epoch_lrs(schedule: str, epochs: int, lr: float = 1e-3) -> list[float]:
    """The lr of each epoch as the learner steps the scheduler: once after every epoch."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build_lr_schedule(optimizer, schedule, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return lrs


@pytest.mark.parametrize("epochs", [20, 35])
def test_official_lr_of_each_epoch_is_the_official_formula(epochs):
    expected = [1e-3 * math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1))) for e in range(epochs)]
    assert epoch_lrs("official_cosine", epochs) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert expected[0] == expected[1] == 1e-3
    if epochs == 20:  # the numbers: mean 0.685e-3 and last 0.097e-3 (torch's cosine: 0.525e-3 and 0.006e-3)
        assert sum(expected) / epochs == pytest.approx(0.685e-3, abs=5e-7) and expected[-1] == pytest.approx(0.097e-3, abs=5e-7)
        cosine = epoch_lrs("cosine", epochs)
        assert cosine == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)])
        assert sum(cosine) / epochs == pytest.approx(0.525e-3, abs=5e-7)


def test_the_learner_steps_the_official_schedule_by_default():
    cfg = RunConfig.from_dict({"data": TINY_SYNTHETIC, "student": {"weights": "random"}, "train": {"epochs": 4, "device": "cpu"}})
    run = ContinualRun(cfg)
    optimizer, scheduler = run.trainer.optimizer(run.student)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3 * math.cos(99 * math.pi * max(e - 1, 0) / (200 * 3)) for e in range(4)])


@pytest.mark.parametrize("scaling", ["unit", "mean_std"])
def test_a_known_pixel_through_each_input_scaling(scaling):
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    stream = build_stream(DataConfig(**TINY_SYNTHETIC, input_scaling=scaling), 32, mean, std)
    test = stream.tasks[0].test
    image, _ = test[0]
    raw = test.images[int(test.indices[0])]  # uint8, 32 x 32: no resize
    for c, y, x in [(0, 3, 5), (1, 17, 30), (2, 31, 0)]:
        value = raw[c, y, x].item() / 255.0
        expected = value if scaling == "unit" else (value - mean[c]) / std[c]
        assert image[c, y, x].item() == pytest.approx(expected, abs=1e-6)
    if scaling == "unit":
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_dkd_at_its_own_default_temperature_matches_a_hand_computation():
    cfg = DistillConfig(method="dkd")
    cfg.validate()
    assert cfg.temperature == 4.0  # the official code's fixed DKD temperature
    ctx = KDContext(student_dim=4, teacher_dim=4, student_depth=6, teacher_depth=6, n_classes=6, n_tasks=2, prompt_method="none",
                    prompt_params=resolve_prompt_params("none", {}), teacher_prompt_layers=(), make_head=lambda d: nn.Linear(d, 6))
    dkd = build_kd_method(cfg, ctx)
    student = torch.tensor([[9.0, 9.0, 9.0, 1.0, 2.0, 0.5], [9.0, 9.0, 9.0, -1.0, 0.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.5, 0.5, -2.0]], dtype=torch.float64)
    targets = torch.tensor([3, 5])  # stream labels; task 2 holds classes 3..5 (past ones are masked out)
    out = ModelOutput(None, student, torch.zeros(()), Attachment(), None, {})
    loss = dkd.loss(out, TeacherSignal(teacher), targets, TaskClasses(past=3, seen=6)).item()

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    T, total_ce, total_kd = 4.0, 0.0, 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), (0, 2)):  # task-local targets
        s, t = s_row[3:], t_row[3:]
        total_ce += -math.log(softmax(s)[y])
        ps, pt = softmax([v / T for v in s]), softmax([v / T for v in t])
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        others = [i for i in range(3) if i != y]
        nckd = kl(softmax([t[i] / T for i in others]), softmax([s[i] / T for i in others]))
        total_kd += (1.0 * tckd + 4.0 * nckd) * T**2
    assert loss == pytest.approx(0.5 * total_ce / 2 + 0.5 * total_kd / 2, rel=1e-9)


@pytest.mark.parametrize("prediction, share", [("weighted", 0.3), ("mean", 0.5)])
def test_the_student_prediction_weights_the_kd_head_by_alpha(prediction, share):
    cfg = DistillConfig(method="cdl_prompt", alpha=0.3, prediction=prediction)
    cfg.validate()
    ctx = KDContext(student_dim=8, teacher_dim=16, student_depth=6, teacher_depth=6, n_classes=4, n_tasks=2, prompt_method="coda",
                    prompt_params=resolve_prompt_params("coda", {"pool_size": 8}), teacher_prompt_layers=(0, 1, 2, 3, 4),
                    make_head=lambda d: nn.Linear(d, 4))
    method = build_kd_method(cfg, ctx)
    features, logits = torch.randn(3, 8), torch.randn(3, 4)
    kd_logits = features @ method.kd_head.weight.T + method.kd_head.bias
    out = ModelOutput(features, logits, torch.zeros(()), Attachment(), None, {})
    assert torch.allclose(method.predict(out), (1 - share) * logits + share * kd_logits, atol=1e-6)


@pytest.mark.parametrize("drop_last, steps", [(True, 2), (False, 3)])
def test_the_last_partial_batch_is_dropped_under_the_official_protocol(drop_last, steps):
    # 2 classes x 10 images a task, no validation split: 20 images in batches of 8
    cfg = RunConfig.from_dict({"data": TINY_SYNTHETIC, "student": {"weights": "random"},
                               "train": {"batch_size": 8, "drop_last": drop_last, "device": "cpu"}})
    run = ContinualRun(cfg)
    sizes = []
    original = run.trainer.step
    run.trainer.step = lambda role, images, *rest: sizes.append(len(images)) or original(role, images, *rest)
    run.run_task()
    assert len(run.stream.tasks[0].train) == 20 and len(sizes) == steps
    assert sizes == ([8, 8] if drop_last else [8, 8, 4])


def test_drop_last_with_fewer_images_than_a_batch_says_nothing_would_train():
    cfg = RunConfig.from_dict({"data": TINY_SYNTHETIC, "student": {"weights": "random"}, "train": {"batch_size": 32, "device": "cpu"}})
    with pytest.raises(ConfigError, match=r"task 1 has 20 training images, fewer than train.batch_size=32.*drop_last"):
        ContinualRun(cfg).run_task()


# -- the protocol as config fields ----------------------------------------------------------------------------
def test_each_protocol_fills_only_the_fields_left_unset_and_the_config_records_them():
    official = RunConfig().validate()
    assert official.protocol == "official"
    for dotted, value in OFFICIAL.settings.items():
        assert official.protocol_record()[dotted] == value
    cfg = RunConfig.from_dict({"protocol": "timm", "train": {"drop_last": True}})
    record = cfg.protocol_record()
    assert record["train.drop_last"] is True  # explicit wins
    assert {k: v for k, v in record.items() if k not in ("protocol", "train.drop_last", "distill.temperature")} == {
        k: v for k, v in TIMM.settings.items() if k != "train.drop_last"}
    again = RunConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()  # the recorded config reproduces the run, whatever the defaults become
    differences = {k for k in TIMM.settings if TIMM.settings[k] != OFFICIAL.settings[k]}
    assert differences == {"data.input_scaling", "data.val_fraction", "train.lr_schedule", "train.drop_last",
                           "distill.teacher_merged_prompts", "forgetting"}
    with pytest.raises(ConfigError, match="protocol='paper' is not valid; choose one of: official, timm"):
        RunConfig.from_dict({"protocol": "paper"})
    assert set(PROTOCOLS) == {"official", "timm"}


def test_the_kd_temperature_defaults_to_each_methods_own_and_an_explicit_one_wins():
    base = {"teacher": {"preset": "demo-t"}}
    assert RunConfig.from_dict(base | {"distill": {"method": "dkd"}}).distill.temperature == 4.0
    assert RunConfig.from_dict(base | {"distill": {"method": "kd"}}).distill.temperature == 2.0
    assert RunConfig.from_dict(base | {"distill": {"method": "dkd", "temperature": 2.5}}).distill.temperature == 2.5


def test_the_teacher_key_follows_every_protocol_field_that_changes_a_teacher_and_no_other():
    base = {"data": {"name": "synthetic"}, "student": {"weights": "random"}, "teacher": {"preset": "demo-t", "weights": "random"},
            "distill": {"method": "kd"}}

    def key(section: str, name: str, value) -> str:
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
        if section:
            raw[section] = dict(raw.get(section, {}), **{name: value})
        else:
            raw[name] = value
        return teacher_key(RunConfig.from_dict(raw))

    reference = teacher_key(RunConfig.from_dict(base))
    changes_teacher = [("data", "input_scaling", "mean_std"), ("data", "val_fraction", 0.1), ("train", "lr_schedule", "cosine"),
                       ("train", "drop_last", False)]
    for section, name, value in changes_teacher:
        assert key(section, name, value) != reference, name
    for section, name, value in [("distill", "prediction", "mean"), ("", "forgetting", "chaudhry"), ("distill", "temperature", 3.0)]:
        assert key(section, name, value) == reference, name
    assert key("", "protocol", "timm") != reference  # through the fields it sets


def test_a_hub_preset_records_its_pretrained_tag_and_an_older_one_is_selectable(monkeypatch):
    cfg = BackboneConfig("vit_base_patch16_224")
    cfg.validate("student")
    assert cfg.pretrained_tag == "augreg2_in21k_ft_in1k"
    older = RunConfig.from_dict({"student": {"preset": "vit_small_patch16_224"},
                                 "teacher": {"preset": "vit_base_patch16_224", "pretrained_tag": "augreg_in21k_ft_in1k"},
                                 "distill": {"method": "kd"}, "data": {"name": "cifar100"}})
    assert older.teacher.pretrained_tag == "augreg_in21k_ft_in1k"
    newer = RunConfig.from_dict(older.to_dict() | {"teacher": {"preset": "vit_base_patch16_224"}})
    assert teacher_key(older) != teacher_key(newer)
    asked = []

    def create_model(name, pretrained=False, **kwargs):
        asked.append(name)
        raise OSError("offline")

    monkeypatch.setattr("cdl_core.backbones.timm.create_model", create_model)
    with pytest.raises(WeightsUnavailableError, match="vit_base_patch16_224.augreg_in21k_ft_in1k"):
        create_backbone(older.teacher)
    assert asked == ["vit_base_patch16_224.augreg_in21k_ft_in1k"]
    with pytest.raises(ConfigError, match="pretrained_tag='augreg' applies only to a hub preset's default weights"):
        RunConfig.from_dict({"student": {"preset": "demo-s", "pretrained_tag": "augreg"}})


# -- spaces and the command line ------------------------------------------------------------------------------
def test_the_paper_space_trains_on_all_training_data_under_the_official_protocol():
    space = load_space("paper")
    for cell in space.cells():
        cfg = space.run_config(cell, space.sample_overrides(cell))
        assert cfg["protocol"] == "official" and cfg["data"]["val_fraction"] == 0.0, cell.key
        assert cfg["data"]["input_scaling"] == "unit" and cfg["train"]["lr_schedule"] == "official_cosine"
    assert not space.metric.startswith("val_")
    smoke = load_space("smoke")
    assert all(smoke.run_config(c)["data"]["val_fraction"] == 0.1 for c in smoke.cells())  # it tunes: it needs one


def test_a_space_that_tunes_or_prunes_without_a_validation_split_is_refused():
    args = dict(name="leaky", description="", pairs=[("demo-t", "demo-s")], methods=["coda"], kd_methods=["kd"],
                datasets=["synthetic"], tune=lambda trial, cell: {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)})
    with pytest.raises(SpaceError, match=r"tunes 3 trials per cell but its runs have no validation split .*'official'.*data.val_fraction"):
        SweepSpace(**args, trials_per_cell=3, pruner="none", pruner_args={}).validate()
    with pytest.raises(SpaceError, match=r"prunes \(pruner='median'\) but its runs have no validation split"):
        SweepSpace(**args, trials_per_cell=1).validate()
    with pytest.raises(SpaceError, match="metric 'val_avg_acc' needs a validation split"):
        SweepSpace(**args, trials_per_cell=1, pruner="none", pruner_args={}).validate()
    SweepSpace(**args, trials_per_cell=3, base={"data.val_fraction": 0.1}).validate()


def test_cdl_core_run_sets_a_protocol_and_single_fields_over_a_config_file(tmp_path):
    parse = run_cli.build_parser().parse_args
    cfg = run_cli.config_from_args(parse(["--protocol", "timm", "--drop-last", "--dataset", "synthetic"]))
    assert (cfg.protocol, cfg.data.input_scaling, cfg.train.lr_schedule, cfg.train.drop_last) == ("timm", "mean_std", "cosine", True)
    saved = tmp_path / "run.json"
    saved.write_text(__import__("json").dumps(RunConfig.from_dict({"data": {"name": "synthetic"}}).to_dict()))
    cfg = run_cli.config_from_args(parse(["--config", str(saved), "--protocol", "timm"]))
    assert (cfg.data.val_fraction, cfg.forgetting) == (0.1, "chaudhry")  # the flag's protocol replaces the file's values
    cfg = run_cli.config_from_args(parse(["--config", str(saved), "--lr-schedule", "constant", "--val-fraction", "0.2"]))
    assert (cfg.protocol, cfg.train.lr_schedule, cfg.data.val_fraction, cfg.train.drop_last) == ("official", "constant", 0.2, True)


def test_a_space_sets_the_protocol_for_every_trial_in_its_base():
    space = SweepSpace(name="timm-space", description="", pairs=[("demo-t", "demo-s"), (None, "demo-s")], methods=["coda"],
                       kd_methods=["dkd"], datasets=["synthetic"], base={"protocol": "timm", "train.drop_last": True}).validate()
    for cell in space.cells():
        cfg = space.run_config(cell)
        assert (cfg["protocol"], cfg["data"]["input_scaling"], cfg["data"]["val_fraction"], cfg["train"]["lr_schedule"]) == (
            "timm", "mean_std", 0.1, "cosine")
        assert cfg["train"]["drop_last"] is True
    kd_cell = next(c for c in space.cells() if c.kd == "dkd")
    assert space.run_config(kd_cell)["distill"]["temperature"] == 4.0
