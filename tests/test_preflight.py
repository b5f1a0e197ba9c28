"""What is checked before a sweep launches anything: the config alone (from preset and dataset metadata, no
torch), the import graph that makes that possible, the services (MLflow, Optuna), and what --resume may change;
and that a config error found inside a trial ends it at once instead of being retried."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from ray import cloudpickle

from orchestrator import resume
from orchestrator.errors import SpaceError, SweepError
from orchestrator.space import SweepSpace, load_space
from orchestrator.plan import make_plan
from orchestrator.sweep import build_parser, main, run_sweep
from sweep_checks import ROOT, TINY, write_space

pytestmark = pytest.mark.usefixtures("forbid_demo_pretraining")


def space(**fields) -> SweepSpace:
    args = dict(name="check", description="", pairs=[("demo-t", "demo-s")], methods=["coda"], kd_methods=["kd"],
                datasets=["synthetic"], base=dict(TINY)) | fields
    return SweepSpace(**args)


@pytest.mark.parametrize("fields, message", [
    ({"base": TINY | {"data.n_tasks": 3}}, "data.n_tasks=3 does not divide the 10 classes of synthetic; use one of: 1, 2, 5, 10"),
    ({"base": TINY | {"prompt.params": {"pool_size": 4}}}, "coda needs at least one component per task: prompt.params.pool_size=4 < 5 tasks"),
    ({"methods": ["dualprompt"], "base": TINY | {"prompt.params": {"pool_size": 3}}}, "dualprompt needs one E-prompt per task"),
    ({"base": TINY | {"prompt.params": {"layers": [0, 4, 6, 9]}}}, "layers [6, 9] do not exist in the student demo-s (depth 6)"),
    ({"pairs": [("vit_base_patch16_224", "demo-s")]}, "differ in input image_size (224 vs 32)"),
    ({"kd_methods": ["cdl_prompt"], "base": TINY | {"distill.params": {"active_components": 500}}},
     "active_components=500 exceeds components=100"),
    ({"methods": ["none"], "kd_methods": ["cdl_prompt"]}, "maps the teacher's prefix prompts, but prompt.method='none'"),
])
def test_the_space_refuses_what_the_config_alone_decides_before_any_trial(fields, message):
    with pytest.raises(SpaceError) as err:
        space(**fields).validate()
    assert message in str(err.value) and "space 'check', cell " in str(err.value)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("argv", [["--space", "full", "--dry-run"], ["--space", "smoke", "--dry-run"], ["--help"]])
def test_help_and_dry_run_import_no_torch(argv):
    done = run_python(
        "import sys\nfrom orchestrator.sweep import main\n"
        f"try:\n    code = main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('exit', code, 'torch' in sys.modules, 'timm' in sys.modules)"
    )
    assert done.stdout.strip().splitlines()[-1] == "exit 0 False False", done.stderr[-2000:]


def test_cdl_core_run_help_imports_no_torch():
    done = run_python("import sys\nfrom cdl_core.run import build_parser\nbuild_parser().format_help()\nprint('torch' in sys.modules)")
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its code (module level or inside functions)."""
    graph: dict[str, set[str]] = {}
    for package in ("cdl_core", "orchestrator"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            edges = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    edges |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    edges.add(node.module)
            graph[name] = {e for e in edges if e.split(".")[0] in ("cdl_core", "orchestrator") and e != name}
    return graph


def test_project_imports_form_no_circle():
    graph = project_imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                pytest.fail("import circle: " + " -> ".join(path[path.index(target):] + [target]))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_errors_and_catalog_sit_at_the_bottom_of_the_import_graph():
    graph = project_imports()
    assert graph["cdl_core.errors"] == set()
    for module, targets in graph.items():
        if module.startswith("cdl_core.catalog"):
            assert all(t.startswith("cdl_core.catalog") or t == "cdl_core.errors" for t in targets), (module, targets)
    for module in ("cdl_core.config", "cdl_core.teacher_identity"):
        assert all(t.startswith("cdl_core.catalog") or t in ("cdl_core.errors", "cdl_core.config") for t in graph[module])


def sweep_args(tmp_path: Path, space_file: str, *extra: str) -> list[str]:
    return ["--space", space_file, "--name", "pre", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--storage-path", str(tmp_path / "results"), *extra]


@pytest.mark.parametrize("url, message", [
    ("notaurl", "error: cannot use the Optuna storage notaurl (ArgumentError"),
    ("postgresql://u@127.0.0.1:9/db", "error: the database driver for the Optuna storage postgresql://u@127.0.0.1:9/db is not installed; "
                                      "install psycopg2-binary (pip install -e '.[cluster]') and name it in the URL: postgresql+psycopg2://u@127.0.0.1:9/db"),
    ("postgresql+psycopg2://u@127.0.0.1:9/db", "error: cannot use the Optuna storage postgresql+psycopg2://u@127.0.0.1:9/db (OperationalError"),
])
def test_a_bad_optuna_storage_stops_the_sweep_before_ray_and_leaves_nothing_to_resume(tmp_path, capsys, url, message):
    import ray

    spec = write_space(tmp_path, "pre", "return {}", pairs=[(None, "demo-s")], kd_methods=["kd"])
    argv = sweep_args(tmp_path, spec)
    argv[argv.index("--optuna-storage") + 1] = url
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error:")] == err[-1:] and err[-1].startswith(message), err
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


def flaky_noop(config, teachers=None, log_file=None):
    """Fails each trial's first two attempts, then reports its tasks and records that it finished."""
    from ray import tune

    log = Path(config["run"]["data"]["root"])
    attempts = log / f"attempts-{config['optuna_trial']}"
    attempts.write_text(str(int(attempts.read_text() if attempts.exists() else 0) + 1))
    if int(attempts.read_text()) <= 2:
        raise RuntimeError("an early attempt fails")
    n_tasks = config["run"]["data"]["n_tasks"]
    for task in range(1, n_tasks + 1):
        tune.report({"task": task, "n_tasks": n_tasks, "val_avg_acc": 50.0, "val_acc_area": 50.0 * task,
                     "test_avg_acc": 50.0, "test_forgetting": 0.0})
    with open(log / "finished.txt", "a") as out:
        out.write(f"{config['optuna_trial']}\n")


@pytest.mark.slow  # ~40 s: two short sweeps on a local Ray
def test_resume_refuses_fixed_arguments_and_applies_the_adjustable_ones(tmp_path, capsys):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is no package: Ray's workers get it by value
    log = tmp_path / "log"
    log.mkdir()
    spec = write_space(tmp_path, "pre", "return {'distill.alpha': trial.suggest_float('alpha', 0.1, 0.9)}",
                       pairs=[("demo-t", "demo-s")], trials_per_cell=3,
                       base=TINY | {"data.n_tasks": 2, "data.root": str(log)})
    first = sweep_args(tmp_path, spec, "--max-failures", "0")
    args = build_parser().parse_args(first)
    loaded = load_space(args.space)
    assert run_sweep(loaded, make_plan(loaded), args, trainable=flaky_noop) == 0
    experiment_path = str(tmp_path / "results" / "pre")
    assert resume.read_record(experiment_path)["max_failures"] == 0
    assert not (log / "finished.txt").exists()  # every first attempt failed, none retried (--max-failures 0)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = "pre/demo-t-demo-s.coda.kd.synthetic.s0"
    capsys.readouterr()

    moved = list(first)
    moved[moved.index("--tracking-uri") + 1] = f"sqlite:///{tmp_path / 'other-mlflow.db'}"
    moved[moved.index("--optuna-storage") + 1] = f"sqlite:///{tmp_path / 'other-optuna.db'}"
    assert main([*moved, "--resume"]) == 2
    line = capsys.readouterr().err.strip()
    assert "--tracking-uri was " in line and "--optuna-storage was " in line and line.count("\n") == 0

    again = build_parser().parse_args([*sweep_args(tmp_path, spec, "--max-failures", "2", "--max-concurrent", "1"), "--resume"])
    assert run_sweep(loaded, make_plan(loaded), again, trainable=flaky_noop) == 0
    out = capsys.readouterr().out
    assert "max concurrency 1, max failures 2" in out and "--max-failures 0 -> 2" in out and "--max-concurrent 0 -> 1" in out
    # each trial's second attempt failed too (its second failure), and the new --max-failures 2 let Tune retry it
    assert sorted((log / "finished.txt").read_text().split()) == ["0", "1", "2"]
    assert resume.read_record(experiment_path)["max_concurrent"] == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [study]  # the probe study is gone
    trials = optuna.load_study(study_name=study, storage=storage).trials
    # Optuna cannot reopen the first run's FAIL trials: each resumed trial completed in a retry carrying its values
    assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["COMPLETE"] * 3
    assert sorted((t.user_attrs["retry_of"], t.params["alpha"]) for t in trials[3:]) == sorted(
        (t.number, t.params["alpha"]) for t in trials[:3])


def test_check_resume_names_every_fixed_difference_and_lists_the_adjustable_ones():
    recorded = {k: "a" for k in resume.FIXED} | {"max_concurrent": 0, "max_failures": 2, "mlflow_wait": 300}
    assert resume.check_resume(recorded, dict(recorded)) == []
    changed = resume.check_resume(recorded, recorded | {"max_failures": 5})
    assert changed == ["--max-failures 2 -> 5"]
    with pytest.raises(SweepError) as err:
        resume.check_resume(recorded, recorded | {"space": "b", "teacher_store": None, "mlflow_wait": 1})
    assert "--space was 'a', now 'b'" in str(err.value) and "--teacher-store (or --no-teacher-reuse) was 'a', now None" in str(err.value)


@pytest.mark.slow  # ~20 s: one trial on a local Ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU: the trial asks for one")
def test_a_config_error_inside_a_trial_ends_it_failed_at_once_with_its_message(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    spec = write_space(tmp_path, "pre", "return {}", pairs=[(None, "demo-s")], base=TINY | {"train.device": "cuda"})
    assert main(sweep_args(tmp_path, spec, "--max-failures", "2")) == 0
    out = capsys.readouterr().out
    assert "failed, config error: none-demo-s.coda.none.synthetic.s0: train.device='cuda' but no CUDA GPU is visible" in out
    results = list((tmp_path / "results" / "pre").glob("*/result.json"))
    assert len(results) == 1 and len(results[0].read_text().splitlines()) == 1  # reported once, never retried
    study = optuna.load_study(study_name="pre/none-demo-s.coda.none.synthetic.s0", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pre").experiment_id], "tags.role = 'trial'")
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert "no CUDA GPU is visible" in run.data.tags["error"]
