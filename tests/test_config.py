"""RunConfig validation (one-line ConfigError messages), serialisation round trip, and the CLI's error exit."""
from __future__ import annotations

import json

import pytest

from cdl_core.config import (
    BackboneConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    PromptConfig,
    RunConfig,
    TrainConfig,
)
from cdl_core.learner import ContinualRun
from cdl_core.run import main

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

STUDENT = BackboneConfig("demo-s", "random")
TEACHER = BackboneConfig("demo-t", "random")


def config(**kw) -> RunConfig:
    base = dict(data=DataConfig(name="synthetic"), student=STUDENT)
    base.update(kw)
    return RunConfig(**base)


def rejected(cfg_or_callable, *fragments: str) -> str:
    """Assert a ConfigError whose message is one line and contains every fragment; return the message."""
    with pytest.raises(ConfigError) as info:
        if isinstance(cfg_or_callable, RunConfig):
            cfg_or_callable.validate()
        else:
            cfg_or_callable()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_a_valid_config_validates_and_returns_itself():
    cfg = config()
    assert cfg.validate() is cfg


def test_unknown_prompt_method_lists_the_valid_ones():
    rejected(config(prompt=PromptConfig("l3p")), "prompt.method='l3p'", "coda", "dualprompt", "l2p", "none")


def test_unknown_prompt_param_is_named_with_the_valid_ones():
    rejected(config(prompt=PromptConfig("l2p", {"pool": 10})), "unknown pool", "pool_size", "top_k")


@pytest.mark.parametrize("method, name", [("l2p", "length"), ("coda", "length"), ("dualprompt", "length"), ("dualprompt", "g_length")])
def test_odd_prompt_length_is_rejected(method, name):
    rejected(config(prompt=PromptConfig(method, {name: 7})), f"prompt.params.{name}=7", "even")


def test_negative_prompt_param_is_rejected():
    rejected(config(prompt=PromptConfig("coda", {"pool_size": -10})), "pool_size", "negative")


def test_top_k_larger_than_the_pool_is_rejected():
    rejected(config(prompt=PromptConfig("l2p", {"pool_size": 4, "top_k": 5})), "top_k=5", "pool_size=4")


def test_unknown_dataset_lists_the_valid_ones():
    rejected(config(data=DataConfig(name="mnist")), "data.name='mnist'", "cifar100", "fashion_mnist", "imagenet_r", "synthetic")


def test_unknown_top_level_field_is_rejected_with_the_valid_fields():
    raw = config().to_dict()
    raw["optimiser"] = "sgd"
    rejected(lambda: RunConfig.from_dict(raw), "unknown field(s) optimiser", "train", "prompt")


def test_unknown_nested_field_names_its_section():
    raw = config().to_dict()
    raw["train"]["epoch"] = 3
    rejected(lambda: RunConfig.from_dict(raw), "train: unknown field(s) epoch", "epochs")


def test_wrong_value_type_is_rejected():
    raw = config().to_dict()
    raw["train"]["epochs"] = "3"
    rejected(lambda: RunConfig.from_dict(raw), "train.epochs", "int")


@pytest.mark.parametrize("epochs", [0, -2])
def test_non_positive_epochs_are_rejected(epochs):
    rejected(config(train=TrainConfig(epochs=epochs)), f"train.epochs={epochs}")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_outside_zero_to_one_is_rejected(fraction):
    rejected(config(data=DataConfig(name="synthetic", val_fraction=fraction)), f"data.val_fraction={fraction}")


@pytest.mark.parametrize("method", ["kd", "dkd", "cdl_prompt"])
def test_kd_method_without_a_teacher_is_rejected(method):
    rejected(config(distill=DistillConfig(method=method)), f"distill.method={method!r}", "teacher")


def test_cdl_prompt_with_prompt_method_none_is_rejected():
    cfg = config(teacher=TEACHER, prompt=PromptConfig("none"), distill=DistillConfig(method="cdl_prompt"))
    rejected(cfg, "cdl_prompt", "prompt.method='none'")
    # the same teacher with a prompt method, or logit KD without prompts, is fine
    config(teacher=TEACHER, prompt=PromptConfig("coda"), distill=DistillConfig(method="cdl_prompt")).validate()
    config(teacher=TEACHER, prompt=PromptConfig("none"), distill=DistillConfig(method="kd")).validate()


@pytest.mark.parametrize(
    "field, value, fragment",
    [("alpha", 1.5, "distill.alpha"), ("temperature", 0.0, "distill.temperature"), ("method", "fitnet", "distill.method")],
)
def test_bad_distill_values_are_rejected(field, value, fragment):
    rejected(config(teacher=TEACHER, distill=DistillConfig(**{field: value})), fragment)


@pytest.mark.parametrize(
    "kw, fragment",
    [(dict(lr=0.0), "train.lr"), (dict(batch_size=0), "train.batch_size"), (dict(device="tpu"), "train.device"),
     (dict(betas=(0.9, 1.0)), "train.betas"), (dict(weight_decay=-1.0), "train.weight_decay")],
)
def test_bad_train_values_are_rejected(kw, fragment):
    rejected(config(train=TrainConfig(**kw)), fragment)


def test_dualprompt_pool_smaller_than_n_tasks_is_rejected_when_the_run_is_built():
    cfg = config(data=DataConfig(name="synthetic", n_tasks=5), prompt=PromptConfig("dualprompt", {"pool_size": 3}))
    rejected(lambda: ContinualRun(cfg), "pool_size=3 < 5 tasks")


def test_round_trip_to_dict_from_dict_and_json_preserves_every_field(tmp_path):
    cfg = RunConfig(
        data=DataConfig(name="synthetic", n_tasks=2, class_order="shuffled", class_order_seed=3, train_per_class=7,
                        val_fraction=0.25, train_augment=False),
        student=STUDENT,
        teacher=TEACHER,
        query="own",
        prompt=PromptConfig("dualprompt", {"pool_size": 12, "layers": [2, 3]}),
        distill=DistillConfig(method="dkd", schedule="joint", alpha=0.3, temperature=4.0),
        train=TrainConfig(epochs=3, batch_size=16, lr=5e-4, betas=(0.8, 0.99), seed=7, device="cpu"),
    ).validate()
    raw = cfg.to_dict()
    assert json.loads(json.dumps(raw)) == raw  # plain JSON types only
    again = RunConfig.from_dict(raw)
    assert again == cfg and again.to_dict() == raw
    assert again.train.betas == (0.8, 0.99)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    assert RunConfig.from_json(path) == cfg


def test_from_json_of_a_missing_or_broken_file_is_a_config_error(tmp_path):
    rejected(lambda: RunConfig.from_json(tmp_path / "missing.json"), "does not exist")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rejected(lambda: RunConfig.from_json(broken), "not valid JSON")


# -- CLI -----------------------------------------------------------------------------------------------------
def run_cli(args: list[str]) -> int:
    """cdl_core.run.main in-process; argparse's own errors exit via SystemExit, which counts the same."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


CLI_BASE = ["--dataset", "synthetic", "--student-weights", "random", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (["--epochs", "0"], "train.epochs=0"),
        (["--method", "l3p"], "prompt.method='l3p'"),
        (["--prompt-param", "length=7", "--method", "coda"], "prompt.params.length=7"),
        (["--method", "dualprompt", "--prompt-param", "pool_size=3", "--n-tasks", "5"], "pool_size=3 < 5 tasks"),
        (["--kd", "kd"], "needs a teacher"),
        (["--epochs", "two"], "invalid int value"),  # rejected by argparse itself
    ],
)
def test_cli_bad_option_value_exits_2_with_error_on_stderr(bad, fragment, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = run_cli(CLI_BASE + bad + ["--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "error:" in captured.err and fragment in captured.err
    assert not out.exists()


def test_cli_tiny_run_exits_0_and_writes_the_accuracy_matrix(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = run_cli(CLI_BASE + ["--method", "l2p", "--n-tasks", "2", "--train-per-class", "4", "--test-per-class", "2",
                               "--batch-size", "8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["runs"]["single"]
    matrix = result["matrices"]["student"]["test"]
    assert [len(row) for row in matrix] == [1, 2]
    assert result["config"]["prompt"]["method"] == "l2p" and result["config"]["student"]["weights"] == "random"
