"""The sweep orchestrator without a Ray cluster: loading and validating search spaces, define-by-run overrides,
the dry-run plan, the resource check, per-cell Optuna search and pruning driven by hand, and the MLflow helpers."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from orchestrator import capacity, sweep
from orchestrator.capacity import Fit, NodeType, node_types, plan_fit, trial_demand
from orchestrator.pruning import CellStudies, OptunaPruningScheduler, PerCellOptunaSearch
from orchestrator.space import SpaceError, SweepSpace, available_spaces, load_space
from orchestrator.plan import make_plan
from orchestrator.sweep import SweepError, main
from orchestrator.artifacts import save_matrix_artifacts
from orchestrator.tracking import flatten, trial_status
from search_spaces import demo_seeds, full, paper, smoke

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")

RANDOM_WEIGHTS = {"student.weights": "random", "teacher.weights": "random"}
TINY = RANDOM_WEIGHTS | {"data.n_tasks": 5, "train.device": "cpu", "data.val_fraction": 0.1}


def write_space(tmp_path: Path, body: str, name: str = "space.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def tiny_space_file(tmp_path: Path, **fields: str) -> str:
    """A valid tiny space file; each keyword replaces one SweepSpace argument's source text."""
    args = {
        "name": '"tiny"', "description": '"test"', "pairs": '[("demo-t", "demo-s"), (None, "demo-s")]',
        "methods": '["coda"]', "kd_methods": '["kd"]', "datasets": '["synthetic"]', "tune": "tune",
        "trials_per_cell": "2", "base": repr(TINY), "pruner": '"median"', "pruner_args": '{"n_startup_trials": 1}',
    } | fields
    return write_space(tmp_path, f"""
        from orchestrator.space import SweepSpace

        def tune(trial, cell):
            if cell.kd == "none":
                return {{}}
            return {{"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)}}

        SPACE = SweepSpace({", ".join(f"{k}={v}" for k, v in args.items())})
        """)


def tuned_trials(space: SweepSpace, n_teacher_cells: int, n_alone_cells: int) -> int:
    """Cells with a teacher tune KD settings (trials_per_cell each); student-alone cells have one trial."""
    return n_teacher_cells * space.trials_per_cell + n_alone_cells


# -- the shipped spaces ------------------------------------------------------------------------------------------
def test_available_spaces_lists_the_shipped_space_modules():
    assert {"smoke", "demo_seeds", "full", "paper"} <= set(available_spaces())


def test_smoke_space_loads_with_twelve_cells_and_thirty_trials():
    space = load_space("smoke")
    assert space == smoke.SPACE
    # 1 teacher pair x 3 prompt methods x 3 KD methods (kd, dcdl, cdl_prompt); 1 student alone x 3 methods
    n_teacher, n_alone = 1 * 3 * 3, 1 * 3
    cells = space.cells()
    assert len(cells) == n_teacher + n_alone == 12
    assert sum(space.trials_for(c) for c in cells) == tuned_trials(space, n_teacher, n_alone) == 9 * 3 + 3 == 30
    assert {c.kd for c in cells} == {"kd", "dcdl", "cdl_prompt", "none"}
    assert all(space.trials_for(c) == (1 if c.kd == "none" else 3) for c in cells)
    dcdl = next(c for c in cells if c.kd == "dcdl")
    for seed in range(20):  # D-CDL's KD prompts stay within the demo backbones' 6 blocks, at even lengths
        drawn = space.sample_overrides(dcdl, seed)
        assert {"distill.alpha", "distill.temperature", "distill.params.layers", "distill.params.length"} <= set(drawn)
        assert 1 <= drawn["distill.params.layers"] <= 6 and drawn["distill.params.length"] in (2, 4, 6, 8)


FULL_KD = ["kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt"]
# What full tunes per KD method beyond alpha and temperature (APT cells tune the ema besides)
FULL_TUNED = {"kd": set(), "deit": set(), "dkd": {"distill.params.non_target_weight"},
              "fitnets": {"distill.params.feature_weight"}, "reviewkd": {"distill.params.feature_weight"},
              "dcdl": {"distill.params.layers", "distill.params.length"},
              "cdl_prompt": {"distill.params.active_components", "distill.params.length"}}


def test_full_space_covers_every_method_both_datasets_three_seeds_on_gpus():
    space = load_space("full")
    L, B, S, T = full.L, full.B, full.S, full.T
    assert set(space.pairs) == {(L, B), (B, S), (B, T), (None, B), (None, S), (None, T)}
    assert set(space.methods) == {"l2p", "dualprompt", "coda", "apt"} and set(space.kd_methods) == set(FULL_KD)
    assert set(space.datasets) == {"cifar100", "imagenet_r"} and list(space.seeds) == [0, 1, 2]
    assert space.gpus_per_trial >= 1
    # teacher pairs x (3 prefix-prompt methods x 7 KD methods + APT x 6, no CDL-Prompt) x datasets x seeds
    n_teacher = 3 * (3 * 7 + 6) * 2 * 3
    n_alone = 3 * 4 * 2 * 3  # no-teacher pairs x methods x datasets x seeds
    n_apt_alone = 3 * 1 * 2 * 3  # these tune APT's ema: 8 trials each
    cells = space.cells()
    assert len(cells) == n_teacher + n_alone == 486 + 72 == 558
    assert not [c for c in cells if c.method == "apt" and c.kd == "cdl_prompt"]
    assert sum(space.trials_for(c) for c in cells) == (n_teacher + n_apt_alone) * 8 + (n_alone - n_apt_alone) == 4086
    for cell in cells:
        drawn = set(space.sample_overrides(cell))
        expected = ({"distill.alpha", "distill.temperature"} | FULL_TUNED[cell.kd] if cell.kd != "none" else set())
        expected |= {"prompt.params.ema"} | ({"prompt.teacher_params"} if cell.teacher else set()) if cell.method == "apt" else set()
        expected |= {"train.batch_size"} if cell.teacher == L else set()
        assert drawn == expected, cell.key


def published_cells(exclude_teachers_alone: bool = True) -> set[tuple]:
    """The paper's cells from the shipped results CSV, read here with pandas (the space reads it with csv)."""
    from orchestrator.report import load_paper

    rows = load_paper()
    cells = {(None if r.teacher == "none" else r.teacher, r.student, r.method, r.kd, r.dataset) for r in rows.itertuples()}
    return {c for c in cells if not (exclude_teachers_alone and c[:2] == (None, paper.L))}


def test_paper_space_is_exactly_the_published_cells_one_untuned_trial_each():
    space = load_space("paper")
    cells = space.cells()
    got = {(c.teacher, c.student, c.method, c.kd, c.dataset) for c in cells}
    assert len(got) == len(cells) and all(c.seed == 0 for c in cells)
    assert got == published_cells()
    # the current board's 4 methods x 2 students x (alone + 6 KD methods) x 2 datasets, plus v1's CDL-Prompt rows
    # (3 methods x 3 pairs x 2 datasets) and its ViT-Ti baselines (3 x 2); v1's ViT-B/S baselines are on both boards
    assert len(cells) == 4 * 2 * 7 * 2 + 3 * 3 * 2 + 3 * 2 == 136
    assert (None, paper.L) not in {(c.teacher, c.student) for c in cells}  # the v1 board's teachers alone: see paper.py
    assert len(published_cells(exclude_teachers_alone=False)) == 136 + 3 * 2
    assert all(space.trials_for(c) == 1 for c in cells) and space.pruner == "none" and space.metric == "test_avg_acc"
    for cell in cells:
        config = space.run_config(cell, space.tune(None, cell))
        assert config["train"]["batch_size"] == (32 if cell.teacher == paper.L else 64), cell.key  # the paper's batches
        assert config["train"]["epochs"] == {"cifar100": 20, "imagenet_r": 35}[cell.dataset]
        assert config["distill"]["alpha"] == 0.5 and config["distill"]["params"] == {} and config["prompt"]["params"] == {}
        assert config["data"]["val_fraction"] == 0.0
    dkd = next(c for c in cells if c.kd == "dkd")
    assert space.run_config(dkd)["distill"]["temperature"] == 4.0  # each method's own default temperature


# -- malformed spaces --------------------------------------------------------------------------------------------
def test_unknown_space_name_lists_the_available_spaces(capsys):
    with pytest.raises(SpaceError, match=r"unknown space 'nope'.*available: .*full.*paper.*smoke"):
        load_space("nope")
    assert main(["--space", "nope", "--dry-run"]) == 2
    assert "error: unknown space 'nope'" in capsys.readouterr().err


def test_space_file_that_does_not_exist_is_an_error(tmp_path, capsys):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(str(tmp_path / "missing.py"))
    assert main(["--space", str(tmp_path / "missing.py"), "--dry-run"]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_tiny_space_file_used_below_is_valid(tmp_path):
    space = load_space(tiny_space_file(tmp_path))
    assert [c.kd for c in space.cells()] == ["kd", "none"]


BAD_SPACES = {
    "no SPACE": (None, r"must define SPACE = SweepSpace"),
    "prompt method": ({"methods": '["coda", "vpt"]'}, r"unknown prompt method \['vpt'\]; valid: .*coda.*l2p"),
    "KD method": ({"kd_methods": '["kd", "fitnet"]'}, r"unknown KD method \['fitnet'\]; valid: .*cdl_prompt.*dkd"),
    "dataset": ({"datasets": '["mnist"]'}, r"unknown dataset \['mnist'\]; valid: .*fashion_mnist.*synthetic"),
    "student preset": ({"pairs": '[(None, "vit_huge")]'}, r"unknown student \['vit_huge'\]; valid: .*demo-s"),
    "teacher preset": ({"pairs": '[("demo-x", "demo-s")]'}, r"unknown teacher \['demo-x'\]; valid: .*demo-t"),
    "pruner": ({"pruner": '"asha"'}, r"unknown pruner \['asha'\]; valid: .*hyperband.*median"),
    "pruner_args": ({"pruner_args": '{"n_startup": 1}'}, r"pruner_args do not fit pruner 'median'"),
    "trials_per_cell": ({"trials_per_cell": "0"}, r"trials_per_cell=0 must be at least 1"),
    "invalid run config": ({"base": repr(TINY | {"train.epochs": 0})}, r"cell .*train\.epochs=0 must be at least 1"),
    "invalid tuned value": ({"tune": 'lambda trial, cell: {"distill.alpha": 2.0}'}, r"distill\.alpha=2\.0 must be in \[0, 1\]"),
    "unknown config field": ({"base": repr(TINY | {"train.epochz": 2})}, r"unknown field\(s\) epochz"),
    "none as KD method": ({"kd_methods": '["kd", "none"]'}, r"'none' in kd_methods duplicates the student-alone"),
}


@pytest.mark.parametrize("case", list(BAD_SPACES))
def test_malformed_space_file_is_a_space_error_and_main_exits_2(tmp_path, capsys, case):
    fields, message = BAD_SPACES[case]
    path = write_space(tmp_path, "from orchestrator.space import SweepSpace\nspace = None\n") if fields is None \
        else tiny_space_file(tmp_path, **fields)
    with pytest.raises(SpaceError, match=message):
        load_space(path)
    assert main(["--space", path, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and re.search(message, captured.err)
    assert captured.out == ""


def test_negative_max_concurrent_is_rejected_with_exit_code_2(capsys):
    assert main(["--space", "smoke", "--max-concurrent", "-1", "--dry-run"]) == 2
    assert "error: --max-concurrent=-1 must be >= 0" in capsys.readouterr().err


def test_cli_overrides_that_make_the_space_invalid_are_rejected(capsys):
    assert main(["--space", "smoke", "--cpus-per-trial", "0", "--dry-run"]) == 2
    assert "error: space 'smoke': cpus_per_trial must be > 0" in capsys.readouterr().err
    assert main(["--space", "smoke", "--gpus-per-trial", "-1", "--dry-run"]) == 2
    assert "gpus_per_trial >= 0" in capsys.readouterr().err


# -- define-by-run overrides -------------------------------------------------------------------------------------
def two_pair_space(**kwargs) -> SweepSpace:
    fields = dict(
        name="t", description="", pairs=[("demo-t", "demo-s"), (None, "demo-s")], methods=["coda"], kd_methods=["kd"],
        datasets=["synthetic", "fashion_mnist"], base=dict(TINY),
    ) | kwargs
    return SweepSpace(**fields).validate()


def test_run_config_applies_base_then_per_dataset_then_tuned_overrides():
    space = two_pair_space(
        base=TINY | {"train.epochs": 2, "train.lr": 0.5},
        per_dataset={"synthetic": {"train.epochs": 3}, "fashion_mnist": {"train.epochs": 5, "train.lr": 0.25}},
    )
    kd = {c.dataset: c for c in space.cells() if c.kd == "kd"}
    synthetic = space.run_config(kd["synthetic"], {"distill.alpha": 0.3, "train.lr": 0.125})
    assert synthetic["train"]["epochs"] == 3 and synthetic["train"]["lr"] == 0.125 and synthetic["distill"]["alpha"] == 0.3
    fmnist = space.run_config(kd["fashion_mnist"])
    assert fmnist["train"]["epochs"] == 5 and fmnist["train"]["lr"] == 0.25 and fmnist["distill"]["alpha"] == 0.5
    assert fmnist["data"]["name"] == "fashion_mnist" and fmnist["data"]["n_tasks"] == 5
    assert (fmnist["teacher"], fmnist["student"]) == ({"preset": "demo-t", "weights": "random", "pretrained_tag": None},
                                                     {"preset": "demo-s", "weights": "random", "pretrained_tag": None})
    assert (fmnist["prompt"]["method"], fmnist["distill"]["method"]) == ("coda", "kd")


def test_teacher_overrides_are_ignored_for_no_teacher_cells():
    space = two_pair_space(base=TINY | {"teacher.preset": "demo-s"})
    alone = next(c for c in space.cells() if c.teacher is None)
    config = space.run_config(alone, {"teacher.weights": "random"})
    assert config["teacher"] is None and config["distill"]["method"] == "none"
    with_teacher = next(c for c in space.cells() if c.teacher)
    assert space.run_config(with_teacher)["teacher"] == {"preset": "demo-s", "weights": "random", "pretrained_tag": None}


def test_override_into_a_non_section_is_a_space_error():
    space = two_pair_space()
    with pytest.raises(SpaceError, match=r"'train\.lr\.x': 'lr' is not a section"):
        space.run_config(space.cells()[0], {"train.lr.x": 1})


def tuned_space(storage_dir: Path, **kwargs) -> tuple[SweepSpace, PerCellOptunaSearch]:
    def tune(trial, cell):
        if cell.kd == "none":
            return {}
        return {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9),
                "train.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                "train.epochs": trial.suggest_int("epochs", 1, 4)}

    fields = dict(name="t", description="", pairs=[("demo-t", "demo-s"), (None, "demo-s")], methods=["coda", "l2p"],
                  kd_methods=["kd"], datasets=["synthetic"], base=dict(TINY), tune=tune, trials_per_cell=3,
                  pruner="median", pruner_args={"n_startup_trials": 2, "n_warmup_steps": 1})
    space = SweepSpace(**(fields | kwargs)).validate()
    storage = f"sqlite:///{storage_dir / 'optuna.db'}"
    return space, PerCellOptunaSearch(space, CellStudies(space, "sweep1", storage))


def test_suggested_trial_carries_the_tuned_values_in_its_run_config(tmp_path):
    space, searcher = tuned_space(tmp_path)
    config = searcher.suggest("t0")  # breadth first: the first cell is a KD cell
    cell = searcher.cells[config["cell"]]
    assert cell.kd == "kd" and set(config["tuned"]) == {"alpha", "lr", "epochs"}
    run = config["run"]
    assert run["distill"]["alpha"] == config["tuned"]["alpha"]
    assert run["train"]["lr"] == config["tuned"]["lr"] and run["train"]["epochs"] == config["tuned"]["epochs"]
    assert run == space.run_config(cell, {"distill.alpha": config["tuned"]["alpha"], "train.lr": config["tuned"]["lr"],
                                          "train.epochs": config["tuned"]["epochs"]})
    study = searcher.studies.study(cell)
    assert config["optuna_study"] == f"sweep1/{cell.key}" == study.study_name
    assert study.trials[config["optuna_trial"]].params == config["tuned"]
    assert study.trials[config["optuna_trial"]].user_attrs["tune_trial_id"] == "t0"


# -- dry run -----------------------------------------------------------------------------------------------------
def dry_run_numbers(out: str) -> dict[str, float]:
    head = re.search(r"space (\S+): (\d+) cells, (\d+) trials", out)
    res = re.search(r"resources per trial: ([\d.]+) CPU, ([\d.]+) GPU", out)
    without = re.search(r"^teacher trainings without reuse:\s+(\d+)", out, flags=re.M)
    with_reuse = re.search(r"^teacher trainings with reuse:\s+(\d+)", out, flags=re.M)
    assert head and res and without and with_reuse, out
    rows = re.findall(r"^(\S+\.s\d+)\s+(\d+)\s+(\S+)$", out, flags=re.M)
    return {"cells": int(head[2]), "trials": int(head[3]), "cpu": float(res[1]), "gpu": float(res[2]),
            "teacher_trainings": int(without[1]), "distinct_teachers": int(with_reuse[1]),
            "rows": {k: int(v) for k, v, _ in rows}, "keys": {k: key for k, _, key in rows},
            "used": "with" if re.search(r"^teacher trainings with reuse:.*<- this sweep", out, flags=re.M) else "without"}


@pytest.mark.parametrize("name", ["smoke", "full", "paper"])
def test_dry_run_prints_the_plan_without_starting_ray(name, capsys):
    import ray

    assert main(["--space", name, "--dry-run"]) == 0
    assert not ray.is_initialized()
    got = dry_run_numbers(capsys.readouterr().out)
    space = load_space(name)
    # A teacher depends on (teacher, student, method, dataset, seed), not on the KD method; full tunes the student's
    # APT ema and keeps the teacher's fixed (prompt.teacher_params), so those cells share teachers too.
    expected = {
        # 9 KD cells x 3 trials + 3 cells alone; a teacher per prompt method
        "smoke": dict(cells=12, trials=30, cpu=1, gpu=0, teacher_trainings=9 * 3, distinct_teachers=3, own=0),
        # 486 KD cells x 8 trials; 18 APT cells alone x 8, 54 other cells alone x 1; shared teachers: 3 pairs x 4
        # methods x 2 datasets x 3 seeds
        "full": dict(cells=558, trials=486 * 8 + 18 * 8 + 54, cpu=4, gpu=1, teacher_trainings=486 * 8,
                     distinct_teachers=3 * 4 * 2 * 3, own=0),
        # 96 + 18 KD cells and 22 cells alone, one trial each; teachers: B->S and L->B x 4 methods x 2 datasets,
        # B->Ti x 3 x 2
        "paper": dict(cells=136, trials=136, cpu=4, gpu=1, teacher_trainings=96 + 18, distinct_teachers=8 + 8 + 6, own=0),
    }[name]
    assert {k: got[k] for k in expected if k != "own"} == {k: v for k, v in expected.items() if k != "own"}
    assert len(got["rows"]) == expected["cells"] and sum(got["rows"].values()) == expected["trials"]
    for key, trials in got["rows"].items():
        tuned = ".none." not in key or (name == "full" and ".apt." in key)
        assert trials == (space.trials_per_cell if tuned else 1), key
    # cells share a teacher key exactly when they differ only in the KD method
    keys = {cell: key for cell, key in got["keys"].items() if key not in ("-", "own")}
    own = [cell for cell, key in got["keys"].items() if key == "own"]
    assert len(own) == expected["own"] and all(".apt." in cell for cell in own)
    assert len(set(keys.values())) == expected["distinct_teachers"] - expected["own"] * space.trials_per_cell
    for cell, key in keys.items():
        for other, other_key in keys.items():
            same_teacher = cell.split(".")[:2] + cell.split(".")[3:] == other.split(".")[:2] + other.split(".")[3:]
            assert (key == other_key) == same_teacher, (cell, other)
    assert all(key == "-" for cell, key in got["keys"].items() if cell.startswith("none-"))
    assert got["used"] == "with"


def test_dry_run_without_teacher_reuse_marks_the_per_trial_count_as_used(capsys):
    assert main(["--space", "smoke", "--dry-run", "--no-teacher-reuse"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^teacher trainings without reuse:\s+27 .*<- this sweep$", out, flags=re.M), out
    assert re.search(r"^teacher trainings with reuse:\s+3 [^<]*$", out, flags=re.M), out


def test_an_empty_teacher_store_location_is_rejected_with_exit_code_2(capsys):
    assert main(["--space", "smoke", "--dry-run", "--teacher-store", " "]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --teacher-store is empty") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("tune", "base", "expected"),
    [
        # tuning a student-side setting: the KD cell's 3 trials share one teacher
        ('return {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)} if cell.kd != "none" else {}', {}, (3, 1, 0)),
        # tuning the learning rate changes the teacher too: each trial trains its own
        ('return {"train.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True)}', {}, (3, 3, 3)),
        # a joint-schedule teacher trains with its student: never shared
        ('return {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9)} if cell.kd != "none" else {}',
         {"distill.schedule": "joint"}, (3, 3, 3)),
    ],
    ids=["student-side-tuning", "tuned-lr", "joint-schedule"],
)
def test_plan_counts_teacher_trainings_with_and_without_reuse(tmp_path, tune, base, expected):
    path = tmp_path / "plan.py"
    path.write_text(
        "from orchestrator.space import SweepSpace\n\n\ndef tune(trial, cell):\n    " + tune + "\n\n\n"
        f"SPACE = SweepSpace(name='plan', description='', pairs=[('demo-t', 'demo-s'), (None, 'demo-s')], methods=['coda'], "
        f"kd_methods=['kd'], datasets=['synthetic'], tune=tune, trials_per_cell=3, base={ {'data.val_fraction': 0.1} | base !r})\n"
    )
    plan = make_plan(load_space(str(path)))
    assert (plan.teacher_trainings_without_reuse, plan.teacher_trainings_with_reuse, plan.own_teacher_trials) == expected


def test_dry_run_applies_resource_overrides(capsys):
    assert main(["--space", "full", "--dry-run", "--gpus-per-trial", "0.5", "--cpus-per-trial", "2"]) == 0
    got = dry_run_numbers(capsys.readouterr().out)
    assert (got["cpu"], got["gpu"]) == (2, 0.5)


# -- resource check ----------------------------------------------------------------------------------------------
def fit_here(space, live, types=None, trials=10, max_concurrent=0):
    return plan_fit(space.name, trial_demand(space.cpus_per_trial, space.gpus_per_trial), live, types, trials, max_concurrent)


def test_resource_check_names_what_the_largest_node_lacks():
    space = load_space("full")
    with pytest.raises(SweepError, match=r"a trial asks for 4 CPU, 1 GPU on one node but the largest node has 2 CPU, 0 GPU") as info:
        fit_here(space, [{"CPU": 2.0}])
    assert "--gpus-per-trial" in str(info.value) and "--cluster-config" in str(info.value)
    with pytest.raises(SweepError, match=r"largest node has 2 CPU, 1 GPU"):  # enough in all, but not on one node
        fit_here(space, [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 1.0}])
    assert fit_here(space, [{"CPU": 8.0, "GPU": 1.0}]) == Fit(None, 0)


def test_resource_check_passes_for_a_cpu_space_that_fits():
    assert fit_here(load_space("smoke"), [{"CPU": 2.0}]) == Fit(None, 0, 2)  # two trials at once, nothing to ask for
    assert fit_here(load_space("smoke"), [{"CPU": 2.0}], max_concurrent=1).concurrency == 1
    with pytest.raises(SweepError, match=r"asks for 1 CPU, 0 GPU on one node but the largest node has 0 CPU"):
        fit_here(load_space("smoke"), [{}])


# The node types of ray_cluster.yaml, as the autoscaler reads them from the config `ray up` leaves on the head.
CLUSTER_TYPES = node_types(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))


def test_a_head_alone_waits_for_the_autoscaler_and_asks_it_for_the_sweeps_concurrency():
    assert {t.name: (t.resources, t.max_workers) for t in CLUSTER_TYPES} == {
        "gpu": ({"CPU": 4.0, "GPU": 1.0}, 8), "gpu4": ({"CPU": 48.0, "GPU": 4.0}, 2)}
    fit = fit_here(load_space("full"), [{}], CLUSTER_TYPES, trials=4086)  # right after `ray up`: the 0-CPU head
    assert fit.waiting.startswith("waiting for the autoscaler: 4086 trials pending, each needs 4 CPU, 1 GPU, which "
                                  "node type 'gpu' holds (4 CPU, 1 GPU a node, up to 8 nodes)")
    assert fit.request == 8 * 1 + 2 * 4  # every trial the autoscaler can make room for at once
    assert fit_here(load_space("full"), [{}], CLUSTER_TYPES, trials=4086, max_concurrent=5).request == 5
    assert fit_here(load_space("full"), [{}], CLUSTER_TYPES, trials=3).request == 3
    # a worker is up already: no waiting, but room is still asked for the rest
    assert fit_here(load_space("full"), [{}, {"CPU": 4.0, "GPU": 1.0}], CLUSTER_TYPES, trials=100) == Fit(None, 17, 17)
    assert fit.concurrency == 16 and fit.pending_trials == 32  # trials Tune places ahead, so starts overlap runs


def test_a_trial_no_node_type_holds_is_refused_naming_the_largest_type():
    space = load_space("full")
    space.gpus_per_trial = 8
    with pytest.raises(SweepError) as info:
        fit_here(space, [{}], CLUSTER_TYPES)
    assert str(info.value).startswith("space 'full' cannot run on this cluster: a trial asks for 4 CPU, 8 GPU, and neither a "
                                      "node that is up nor a node type the autoscaler can add holds it (the largest type, "
                                      "'gpu4', has 48 CPU, 4 GPU)")
    no_more = [NodeType("gpu", {"CPU": 4.0, "GPU": 1.0}, 0)]  # max_workers 0: nothing can be added
    with pytest.raises(SweepError, match="largest node has 0 CPU, 0 GPU"):
        fit_here(load_space("full"), [{}], no_more)


def test_a_lab_cluster_whose_servers_are_still_joining_waits_instead_of_refusing():
    from ray.autoscaler._private.util import prepare_config

    # Ray's local provider: one node type for the head and the listed servers, with no declared resources
    lab = node_types(prepare_config(yaml.safe_load((ROOT / "ray_cluster_local.yaml").read_text())))
    assert lab == [NodeType("local.cluster.node", {}, 2)]
    fit = fit_here(load_space("full"), [{}], lab)
    assert "node types 'local.cluster.node' declare no resources" in fit.waiting and fit.request == 0
    # where Ray fills the head type's max_workers with 0 (every other provider), it adds nothing
    assert node_types(prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))) == CLUSTER_TYPES


def test_the_autoscaling_config_is_found_from_the_flag_the_head_monitor_or_ray_ups_bootstrap_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    proc = tmp_path / "proc"
    config = tmp_path / "autoscaling.yaml"
    config.write_text("available_node_types: {}\n")
    (proc / "41").mkdir(parents=True)
    (proc / "41" / "cmdline").write_bytes(b"\0".join([b"python", b"-u", b"/x/ray/autoscaler/_private/monitor.py",
                                                       b"--gcs-address=10.0.0.1:6379", f"--autoscaling-config={config}".encode()]))
    assert capacity.monitor_config("10.0.0.1:6379", proc) == config
    assert capacity.monitor_config("10.0.0.2:6379", proc) is None  # another cluster's monitor
    assert capacity.find_autoscaling_config(None, "10.0.0.9:6379") is None
    (tmp_path / "ray_bootstrap_config.yaml").write_text("available_node_types: {}\n")
    assert capacity.find_autoscaling_config(None, "10.0.0.9:6379") == tmp_path / "ray_bootstrap_config.yaml"
    assert capacity.find_autoscaling_config(str(config), "10.0.0.9:6379") == config
    with pytest.raises(SweepError, match=r"--cluster-config /nowhere.yaml: no such file"):
        capacity.find_autoscaling_config("/nowhere.yaml", "10.0.0.9:6379")
    config.write_text("just: text\n")
    with pytest.raises(SweepError, match=r"has no available_node_types"):
        capacity.read_config(config)


def test_gpus_per_trial_zero_on_the_command_line_makes_a_gpu_space_fit(monkeypatch):
    seen = {}

    def fake_run_sweep(space, plan, args):  # what run_sweep does first, with this machine's resources
        seen["space"] = space
        fit_here(space, [{"CPU": 2.0}])
        return 0

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(sweep, "make_plan", lambda space: None)  # the full space's 558 cells' plan is not what is tested
    assert main(["--space", "full", "--gpus-per-trial", "0", "--cpus-per-trial", "1"]) == 0
    assert (seen["space"].gpus_per_trial, seen["space"].cpus_per_trial) == (0, 1)
    assert main(["--space", "full", "--cpus-per-trial", "1"]) == 2  # still asks for one GPU
    assert full.SPACE.gpus_per_trial == 1 and load_space("full").gpus_per_trial == 1  # the module's SPACE is untouched


# -- per-cell Optuna search and pruning, driven without Ray ------------------------------------------------------
def report(scheduler: OptunaPruningScheduler, trial_id: str, task: int, n_tasks: int, value: float) -> str:
    result = {"task": task, "n_tasks": n_tasks, "val_avg_acc": value, "val_acc_area": value, "test_avg_acc": 0.0}
    return scheduler.on_trial_result(None, SimpleNamespace(trial_id=trial_id), result)


def test_trials_are_assigned_breadth_first_and_each_cell_gets_its_quota_then_finished(tmp_path):
    space, searcher = tuned_space(tmp_path)
    cells = space.cells()
    assert len(cells) == 4  # (kd, none) x (coda, l2p)
    quota = {c.key: (3 if c.kd == "kd" else 1) for c in cells}
    configs = [searcher.suggest(f"t{i}") for i in range(sum(quota.values()))]
    assert all(isinstance(c, dict) for c in configs)
    assert {c["cell"] for c in configs[: len(cells)]} == set(quota)  # every cell gets a trial first
    assert {c["cell"] for c in configs[len(cells): len(cells) + 2]} == {k for k, n in quota.items() if n == 3}
    assert searcher.suggest("extra") == Searcher.FINISHED
    for cell in cells:
        study = searcher.studies.study(cell)
        assert len(study.trials) == quota[cell.key] == space.trials_for(cell)
        assert [t.number for t in study.trials] == sorted(c["optuna_trial"] for c in configs if c["cell"] == cell.key)
    names = {s.study_name for s in optuna.get_all_study_summaries(searcher.studies.storage_url)}
    assert names == {f"sweep1/{c.key}" for c in cells}


def test_a_trial_far_below_its_cells_completed_trials_is_pruned_and_recorded_pruned(tmp_path):
    space, searcher = tuned_space(tmp_path)
    scheduler = OptunaPruningScheduler(searcher)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(8)}
    by_cell: dict[str, list[str]] = {}
    for tid, config in configs.items():
        by_cell.setdefault(config["cell"], []).append(tid)
    kd_cells = [k for k, ids in by_cell.items() if len(ids) == 3]
    (good1, good2, bad), other = by_cell[kd_cells[0]], by_cell[kd_cells[1]][0]
    for tid in (good1, good2):
        for task in (1, 2, 3):
            assert report(scheduler, tid, task, 3, 90.0) == TrialScheduler.CONTINUE
        searcher.on_trial_complete(tid, {"val_avg_acc": 90.0, "task": 3, "n_tasks": 3})
    assert report(scheduler, bad, 1, 3, 10.0) == TrialScheduler.STOP
    assert searcher.pruned == {bad: 1}
    # the same values in another cell are not judged by the first cell's history
    assert report(scheduler, other, 1, 3, 10.0) == TrialScheduler.CONTINUE
    assert report(scheduler, other, 2, 3, 10.0) == TrialScheduler.CONTINUE
    searcher.on_trial_complete(bad, {"val_avg_acc": 10.0, "task": 1, "n_tasks": 3})
    study = searcher.studies.study(searcher.cells[kd_cells[0]])
    states = {t.number: t.state for t in study.trials}
    assert states[configs[bad]["optuna_trial"]] == optuna.trial.TrialState.PRUNED
    assert study.trials[configs[bad]["optuna_trial"]].intermediate_values == {1: 10.0}
    assert [states[configs[t]["optuna_trial"]] for t in (good1, good2)] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [study.trials[configs[t]["optuna_trial"]].value for t in (good1, good2)] == [90.0, 90.0]
    assert study.trials[configs[good1]["optuna_trial"]].intermediate_values == {1: 90.0, 2: 90.0, 3: 90.0}


def two_good_trials_done(tmp_path: Path):
    """A KD cell with 3 trials of 3 tasks whose first two completed at 90%: (searcher, scheduler, configs, cell, third)."""
    space, searcher = tuned_space(tmp_path, trials_per_cell=3)
    scheduler = OptunaPruningScheduler(searcher)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(8)}
    cell = configs["t0"]["cell"]
    good1, good2, third = [t for t, c in configs.items() if c["cell"] == cell]
    for tid in (good1, good2):
        for task in (1, 2, 3):
            report(scheduler, tid, task, 3, 90.0)
        searcher.on_trial_complete(tid, {"val_avg_acc": 90.0, "task": 3, "n_tasks": 3})
    return searcher, scheduler, configs, cell, third


def test_a_trial_is_never_pruned_at_its_last_task(tmp_path):
    searcher, scheduler, configs, cell, late = two_good_trials_done(tmp_path)
    # a trial whose first report is its last task (e.g. restored from a checkpoint): the pruner would stop it
    # at any earlier task with this value, but after the last task there is nothing left to save
    assert report(scheduler, late, 3, 3, 10.0) == TrialScheduler.CONTINUE
    assert late not in searcher.pruned
    searcher.on_trial_complete(late, {"val_avg_acc": 10.0, "task": 3, "n_tasks": 3})
    trial = searcher.studies.study(searcher.cells[cell]).trials[configs[late]["optuna_trial"]]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 10.0


def test_an_optuna_trial_that_a_killed_driver_never_recorded_is_replayed_not_duplicated(tmp_path):
    space, searcher = tuned_space(tmp_path)
    searcher.suggest("t0")
    searcher.save(str(tmp_path / "snapshot"))  # Tune's last experiment snapshot
    lost = searcher.suggest("t1")  # asked after it; the driver is killed before the next snapshot
    cell = searcher.cells[lost["cell"]]
    n_trials = len(searcher.studies.study(cell).trials)

    _, restored = tuned_space(tmp_path)  # `--resume`: a new driver, the same Optuna storage
    restored.restore(str(tmp_path / "snapshot"))
    replay = restored.suggest("t9")
    assert (replay["cell"], replay["optuna_trial"], replay["tuned"]) == (lost["cell"], lost["optuna_trial"], lost["tuned"])
    assert replay["run"] == lost["run"]
    study = restored.studies.study(cell)
    assert len(study.trials) == n_trials  # no second Optuna trial for the same slot
    assert study.trials[replay["optuna_trial"]].user_attrs["tune_trial_id"] == "t9"
    # the next trial of that cell is a new one
    following = restored.suggest("t10")
    assert following["optuna_trial"] != replay["optuna_trial"] or following["cell"] != replay["cell"]


def test_a_pruned_trial_restored_after_a_driver_restart_is_stopped_again_without_reporting(tmp_path):
    searcher, scheduler, configs, cell, bad = two_good_trials_done(tmp_path)
    assert report(scheduler, bad, 1, 3, 10.0) == TrialScheduler.STOP
    searcher.on_trial_complete(bad, {"val_avg_acc": 10.0, "task": 1, "n_tasks": 3})
    # Tune restarts it from its task-1 checkpoint (its stop was not in the last snapshot): it stops again, and
    # its finished Optuna trial is not reported to (which Optuna would refuse)
    assert report(scheduler, bad, 2, 3, 95.0) == TrialScheduler.STOP
    trial = searcher.studies.study(searcher.cells[cell]).trials[configs[bad]["optuna_trial"]]
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {1: 10.0}


def test_errors_and_results_without_the_metric_are_told_as_failed(tmp_path):
    space, searcher = tuned_space(tmp_path)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(3)}
    searcher.on_trial_complete("t0", None, error=True)
    searcher.on_trial_complete("t1", {"task": 1})
    searcher.on_trial_complete("t2", {"val_avg_acc": 55.0})
    searcher.on_trial_complete("t2", error=True)  # already told: ignored
    searcher.on_trial_complete("unknown")  # not ours: ignored
    states = {}
    for tid, config in configs.items():
        trial = searcher.studies.study(searcher.cells[config["cell"]]).trials[config["optuna_trial"]]
        states[tid] = (trial.state, trial.value)
    assert states == {"t0": (optuna.trial.TrialState.FAIL, None), "t1": (optuna.trial.TrialState.FAIL, None),
                      "t2": (optuna.trial.TrialState.COMPLETE, 55.0)}


def test_the_searcher_keeps_the_concurrency_limit_itself_counting_restored_trials(tmp_path):
    space, searcher = tuned_space(tmp_path)
    assert searcher.set_max_concurrency(2) is True  # so Tune's ConcurrencyLimiter forwards every outcome
    assert searcher.suggest("t0") and searcher.suggest("t1")
    assert searcher.suggest("t2") is None  # two unfinished: wait
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))
    restored = PerCellOptunaSearch(space, CellStudies(space, "sweep1", searcher.studies.storage_url))  # a new driver
    restored.set_max_concurrency(2)
    restored.restore(str(checkpoint))
    assert restored.suggest("t2") is None
    restored.on_trial_complete("t0", {"val_avg_acc": 50.0})
    assert restored.suggest("t2") is not None


def test_an_errored_trial_resumed_by_tune_continues_in_a_retry_with_the_same_values(tmp_path):
    space, searcher = tuned_space(tmp_path)
    config = searcher.suggest("t0")
    cell = searcher.cells[config["cell"]]
    searcher.on_trial_complete("t0", None, error=True)  # errored for good in the first run: FAIL
    assert searcher.studies.outcome(cell, config["optuna_trial"]) == optuna.trial.TrialState.FAIL
    # --resume restarted it from its checkpoint: it reports its next task, then completes
    assert searcher.should_prune("t0", 2, 3, 40.0) is False
    searcher.on_trial_complete("t0", {"val_avg_acc": 61.0})
    trials = searcher.studies.study(cell).trials
    failed, retry = trials[config["optuna_trial"]], trials[-1]
    assert failed.state == optuna.trial.TrialState.FAIL and retry.user_attrs["retry_of"] == failed.number
    assert retry.params == failed.params == config["tuned"] and retry.intermediate_values == {2: 40.0}
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.value == 61.0
    assert searcher.studies.outcome(cell, config["optuna_trial"]) == optuna.trial.TrialState.COMPLETE


def test_searcher_save_and_restore_keeps_assignments_and_pruned_trials(tmp_path):
    space, searcher = tuned_space(tmp_path)
    scheduler = OptunaPruningScheduler(searcher)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(6)}
    cell = configs["t0"]["cell"]
    same_cell = [t for t, c in configs.items() if c["cell"] == cell]
    assert len(same_cell) == 2
    searcher.pruned["t1"] = 2  # as if pruned after task 2
    report(scheduler, same_cell[0], 1, 3, 70.0)
    checkpoint = tmp_path / "searcher.pkl"
    searcher.save(str(checkpoint))

    _, restored = tuned_space(tmp_path)  # a fresh driver: same space and storage
    restored.restore(str(checkpoint))
    assert restored.assigned == searcher.assigned and restored.pruned == {"t1": 2}
    assert restored.suggest("t0") is None  # Tune re-asking for a known trial
    # remaining quota continues where it stopped: 8 trials in all
    more = [restored.suggest(f"n{i}") for i in range(2)]
    assert all(isinstance(m, dict) for m in more) and restored.suggest("n9") == Searcher.FINISHED
    for config in more:  # a fresh sampler must not replay the settings its cell tried before the restart
        earlier = [c["tuned"] for c in configs.values() if c["cell"] == config["cell"]]
        assert len(earlier) == 2 and config["tuned"] not in earlier
    # a trial started before the restart keeps reporting into, and finishing, its Optuna trial
    report(OptunaPruningScheduler(restored), same_cell[0], 2, 3, 75.0)
    restored.on_trial_complete(same_cell[0], {"val_avg_acc": 80.0})
    trial = restored.studies.study(restored.cells[cell]).trials[configs[same_cell[0]]["optuna_trial"]]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 80.0
    assert trial.intermediate_values == {1: 70.0, 2: 75.0}


def test_searcher_pickles_without_database_handles(tmp_path):
    from ray import cloudpickle  # what Tune pickles the search algorithm with

    space, searcher = tuned_space(tmp_path)
    searcher.suggest("t0")
    searcher.studies.study(searcher.cells[searcher.assigned["t0"][0]])
    clone = cloudpickle.loads(cloudpickle.dumps(searcher))
    assert clone.assigned == searcher.assigned and clone._live == {} and clone.studies._studies == {}


def test_a_task_redone_after_a_resume_from_the_checkpoint_before_keeps_its_first_value_in_optuna(tmp_path):
    # Tune snapshots the experiment on its own period, so a killed driver's snapshot may name a task before a
    # trial's latest: the resumed trial redoes that task and reports it again.
    space, searcher = tuned_space(tmp_path)
    scheduler = OptunaPruningScheduler(searcher)
    config = searcher.suggest("t0")
    for task in (1, 2):
        assert report(scheduler, "t0", task, 3, 80.0 + task) == TrialScheduler.CONTINUE
    snapshot = tmp_path / "snapshot"
    searcher.save(str(snapshot))

    _, restored = tuned_space(tmp_path)  # `--resume`: a new driver, the same Optuna storage
    restored.restore(str(snapshot))
    scheduler = OptunaPruningScheduler(restored)
    with pytest.warns(UserWarning, match="already reported"):
        assert report(scheduler, "t0", 2, 3, 99.0) == TrialScheduler.CONTINUE
    assert report(scheduler, "t0", 3, 3, 83.0) == TrialScheduler.CONTINUE
    restored.on_trial_complete("t0", {"val_avg_acc": 83.0, "task": 3, "n_tasks": 3})
    trial = restored.studies.study(restored.cells[config["cell"]]).trials[config["optuna_trial"]]
    assert trial.intermediate_values == {1: 81.0, 2: 82.0, 3: 83.0}
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 83.0


# -- tracking helpers --------------------------------------------------------------------------------------------
def test_flatten_gives_dotted_string_params():
    tree = {"data": {"name": "synthetic", "n_tasks": 5, "root": None}, "train": {"betas": [0.9, 0.999]},
            "teacher": None, "prompt": {"params": {}}}
    assert flatten(tree) == {"data.name": "synthetic", "data.n_tasks": "5", "data.root": "None",
                             "train.betas": "[0.9, 0.999]", "teacher": "None", "prompt.params": "{}"}


def test_trial_status_distinguishes_completed_pruned_and_failed():
    assert trial_status({"task": 5, "n_tasks": 5}) == "completed"
    assert trial_status({"task": 2, "n_tasks": 5}) == "pruned"
    assert trial_status({}) == "failed" and trial_status(None) == "failed"


def test_save_matrix_artifacts_writes_the_matrix_csv_and_two_pngs(tmp_path):
    matrix = [[90.0], [80.5, 70.25], [60.0, 50.0, 40.0]]
    paths = save_matrix_artifacts(matrix, tmp_path, "cell")
    assert [p.name for p in paths] == ["accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_curve.png"]
    assert paths[0].read_text().splitlines() == [
        "after_task,task1,task2,task3", "1,90.00,,", "2,80.50,70.25,", "3,60.00,50.00,40.00"]
    for png in paths[1:]:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_a_trial_whose_accuracy_falls_faster_than_its_cells_is_pruned_although_its_first_task_was_as_good(tmp_path):
    """Continual accuracy falls as tasks arrive. The pruner sees the area under the accuracy curve so far
    (`val_acc_area`), so a trial that starts as well as the others but forgets faster is pruned; judged on
    its raw accuracy, Optuna's median pruner would compare its best (task-1) value and never prune it."""
    from orchestrator.trainable import task_metrics

    space, searcher = tuned_space(tmp_path)
    scheduler = OptunaPruningScheduler(searcher)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(8)}
    cell = next(key for key in {c["cell"] for c in configs.values()} if key.split(".")[2] == "kd")
    good1, good2, bad = [tid for tid, c in configs.items() if c["cell"] == cell]

    def report_curve(tid: str, accuracies: list[float]) -> str:
        # the metrics the trainable reports for a run whose val accuracy after task t is accuracies[t-1]
        matrices: list[list[float]] = []
        decision = TrialScheduler.CONTINUE
        for t, acc in enumerate(accuracies, start=1):
            matrices.append([acc] * t)
            run = SimpleNamespace(n_tasks=4, teacher_entry=None, cfg=SimpleNamespace(forgetting="cdl"),
                                  state=SimpleNamespace(matrices={"student": {"val": matrices, "test": matrices}}))
            result = task_metrics(run, SimpleNamespace(task_id=t - 1, seconds={"total": 0.0}))
            decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=tid), result)
            if decision == TrialScheduler.STOP:
                break
        searcher.on_trial_complete(tid, result)  # what Tune does when a trial ends, stopped or not
        return f"stopped after task {t}" if decision == TrialScheduler.STOP else decision

    assert report_curve(good1, [95.0, 70.0, 60.0, 50.0]) == TrialScheduler.CONTINUE
    assert report_curve(good2, [95.0, 72.0, 62.0, 52.0]) == TrialScheduler.CONTINUE
    assert report_curve(bad, [95.0, 40.0, 30.0, 20.0]) == "stopped after task 2"
    trial = searcher.studies.study(searcher.cells[cell]).trials[configs[bad]["optuna_trial"]]
    assert trial.state.name == "PRUNED" and max(trial.intermediate_values) == 2


def test_a_task_redone_after_a_driver_restart_is_logged_to_mlflow_once(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import MlflowTracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tuned_space(tmp_path)[1].suggest("t0")  # a trial's config as Tune holds it
    trial = SimpleNamespace(trial_id="t0", config=config, status="RUNNING", last_result={}, checkpoint=None)

    def driver(tasks: list[int]) -> MlflowTracking:
        tracking = MlflowTracking(uri, "exp", "sweep1", {"space": "tiny"})
        tracking.setup()
        tracking.on_trial_start(0, [], trial)
        for task in tasks:
            tracking.on_trial_result(0, [], trial, {"task": task, "n_tasks": 3, "val_avg_acc": 70.0 + task, "timestamp": 0})
        assert tracking.outbox.flush(60)
        return tracking

    first = driver([1, 2])
    run_id = first._runs["t0"]
    driver([2, 3])  # killed driver, resumed from task 1's checkpoint: task 2 is redone
    history = MlflowClient(uri).get_metric_history(run_id, "val_avg_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 71.0), (2, 72.0), (3, 73.0)]


def test_the_teacher_sharing_handle_every_trial_unpickles_does_not_import_torch():
    # every trial process unpickles its TeacherSharing; importing torch for it cost 1.6 s per no-op trial
    import subprocess
    import sys

    code = ("import pickle, sys; from orchestrator.teachers import TeacherSharing; "
            "pickle.loads(pickle.dumps(TeacherSharing('/tmp/store', 'leases'))); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False", out.stderr


def test_tune_keeps_as_many_trials_placed_ahead_as_can_run_at_once_and_a_users_setting_wins(monkeypatch):
    from ray.tune.execution.tune_controller import _get_max_pending_trials

    searcher = PerCellOptunaSearch.__new__(PerCellOptunaSearch)  # a searcher of its own: Tune's rule keeps one pending
    monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
    assert _get_max_pending_trials(searcher) == 1
    with sweep.pending_trials(Fit(None, 0, 3).pending_trials):
        assert _get_max_pending_trials(searcher) == 6
    assert "TUNE_MAX_PENDING_TRIALS_PG" not in os.environ  # the next sweep in this process starts from Tune's rule
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "5")
    with sweep.pending_trials(6):
        assert _get_max_pending_trials(searcher) == 5


def test_each_tuned_cells_first_trial_runs_the_defaults_enqueued_then_the_sampler_tunes(tmp_path):
    space, searcher = tuned_space(tmp_path)
    configs = [searcher.suggest(f"t{i}") for i in range(5)]  # breadth first: the 2 KD cells, 2 alone cells, then a KD cell's 2nd
    first = {c["cell"]: c for c in configs[:4]}
    for config in first.values():
        assert config["setting"] == "default" and config["optuna_trial"] == 0
        study = searcher.studies.study(searcher.cells[config["cell"]])
        assert study.get_trials(deepcopy=False)[0].user_attrs["setting"] == "default"
        if searcher.cells[config["cell"]].kd == "kd":  # the run config's own defaults (DESIGN: a = 0.5; Adam lr 1e-3)
            assert config["tuned"] == {"alpha": 0.5, "lr": 1e-3, "epochs": 1}
            assert config["run"]["distill"]["alpha"] == 0.5 and config["run"]["train"]["lr"] == 1e-3
        else:
            assert config["tuned"] == {}
    second = configs[4]
    assert second["setting"] == "tuned" and second["optuna_trial"] == 1 and second["tuned"]["alpha"] != 0.5


def test_the_defaults_of_the_smoke_spaces_tuned_settings_are_the_methods_own():
    cells = {cell.kd: cell for cell in smoke.SPACE.cells() if cell.method == "coda"}
    # DESIGN.md section 2: a = 0.5, T = 2; D-CDL `12 6` (layers, length), its layers capped at the demo student's depth
    # (6) as the run caps them, so the default lies in the space's range; CDL-Prompt's mapping keeps every component
    assert smoke.SPACE.default_params(cells["kd"]) == {"alpha": 0.5, "temperature": 2.0}
    assert smoke.SPACE.default_params(cells["dcdl"]) == {"alpha": 0.5, "temperature": 2.0, "kd_layers": smoke.DEPTH, "kd_length": 6}
    assert smoke.SPACE.default_params(cells["none"]) == {}


def test_demo_seeds_tunes_the_student_alone_with_the_kd_cells_budget_over_its_own_knobs(tmp_path):
    space = demo_seeds.SPACE.validate()
    searcher = PerCellOptunaSearch(space, CellStudies(space, "seeds", f"sqlite:///{tmp_path / 'optuna.db'}"))
    configs = [searcher.suggest(f"t{i}") for i in range(2 * len(searcher.cells))]  # breadth first: two per cell
    alone = [c for c in configs if searcher.cells[c["cell"]].kd == "none"]
    assert len(alone) == 6 and {space.trials_for(searcher.cells[c["cell"]]) for c in configs} == {3}
    for config in alone:
        run = config["run"]
        if config["optuna_trial"] == 0:  # the defaults: Adam's 1e-3 (DESIGN.md section 2) and CODA's 8-token prompts
            assert config["setting"] == "default" and config["tuned"] == {"lr": 1e-3, "prompt_length": 8}
        else:
            assert config["setting"] == "tuned" and 3e-4 <= config["tuned"]["lr"] <= 3e-3
        assert run["train"]["lr"] == config["tuned"]["lr"] and run["prompt"]["params"]["length"] == config["tuned"]["prompt_length"]
    assert sorted(c["optuna_trial"] for c in alone) == [0, 0, 0, 1, 1, 1]


def test_a_tune_that_computes_a_setting_from_a_suggestion_is_refused_with_the_fix(tmp_path):
    with pytest.raises(SpaceError, match="return each suggested value as the setting itself"):  # at validation: before launch
        tuned_space(tmp_path, tune=lambda trial, cell: {"distill.params.length": 2 * trial.suggest_int("half", 1, 4)}
                    if cell.kd != "none" else {}, kd_methods=["dcdl"])


def test_default_params_give_tune_a_real_first_trial_beside_the_recorded_suggestions(tmp_path):
    """A tune may read the trial itself (the e2e spaces plant settings by trial.number): the stand-in is trial 0."""
    space, _ = tuned_space(tmp_path, tune=lambda trial, cell: {"distill.alpha": trial.suggest_float("alpha", 0.1, 0.9),
                                                               "train.epochs": 2 if trial.number == 0 else 1} if cell.kd != "none" else {})
    cell = next(c for c in space.cells() if c.kd == "kd")
    assert space.default_params(cell) == {"alpha": 0.5}
