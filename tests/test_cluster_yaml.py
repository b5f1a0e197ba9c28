"""`ray_cluster.yaml` goes through Ray's own cluster-config preparation and schema validation (what `ray up` does
before it touches the cloud), and holds what the README's cluster walkthrough relies on."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.sweep import build_parser

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)  # raises on anything the schema rejects
    return prepared


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text()


def commands(config: dict, key: str) -> str:
    return "\n".join(config[key])


def test_the_cluster_is_on_aws_with_a_cpu_head_that_runs_no_trials(config):
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU instance


def test_gpu_worker_types_autoscale_and_fit_a_trial_of_the_full_space(config):
    from orchestrator.space import load_space

    full = load_space("full")
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert len(workers) >= 1
    for name, node_type in workers.items():
        assert node_type["resources"]["GPU"] >= 1, name
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p")), name
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"], name
        # at least one trial of the full space fits a node
        assert node_type["resources"]["CPU"] >= full.cpus_per_trial and node_type["resources"]["GPU"] >= full.gpus_per_trial


def test_every_node_installs_this_project_with_its_pinned_dependencies(config):
    assert "/home/ubuntu/cdl" in config["file_mounts"] and config["file_mounts"]["/home/ubuntu/cdl"] == "."
    setup = commands(config, "setup_commands")
    assert "pip install -q -e ~/cdl" in setup  # pyproject.toml pins torch, ray, mlflow, optuna
    assert "python3.11 -m venv ~/venv" in setup
    worker_setup = commands(config, "worker_setup_commands")
    assert "pip install -q -e ~/cdl" in worker_setup  # prepare_config merges the common setup into each node's


def test_the_head_runs_mlflow_on_localhost_over_postgresql_and_has_the_optuna_database(config):
    head_setup = commands(config, "head_setup_commands")
    for needed in ("apt-get install -yq postgresql", "createdb mlflow", "createdb optuna", "psycopg2-binary", "optuna-dashboard"):
        assert needed in head_setup, needed
    start = commands(config, "head_start_ray_commands")
    server = next(line for line in config["head_start_ray_commands"] if "mlflow server --" in line)
    args = shlex.split(server.split(">")[0].replace("nohup", ""))
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "5000"
    assert args[args.index("--backend-store-uri") + 1] == "postgresql+psycopg2:///mlflow"
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://REPLACE_WITH_BUCKET/cdl/")
    assert "ray start --head" in start and "--dashboard-host=127.0.0.1" in start
    assert "ray start --address=$RAY_HEAD_IP:6379" in commands(config, "worker_start_ray_commands")


def test_every_node_starts_ray_with_token_authentication_and_the_launchers_token(config, readme):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(line for line in config[key] if "ray start" in line)
        assert start.startswith("export RAY_AUTH_MODE=token;"), key
    assert config["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in readme


def test_the_file_holds_placeholders_not_credentials(config):
    text = (ROOT / "ray_cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    assert not re.search(r"(?<![\d.])\d{12}(?![\d.])", text)  # account ids
    assert not re.search(r"(?i)(secret|password|access_key)\w*\s*[:=]", text)  # no key: value credentials
    assert not re.search(r"\bami-[0-9a-f]{8,}", text)  # a real, region-bound AMI id
    placeholders = set(re.findall(r"REPLACE_WITH_[A-Z_]+", text))
    assert placeholders == {"REPLACE_WITH_BUCKET", "REPLACE_WITH_INSTANCE_PROFILE", "REPLACE_WITH_DLAMI_ID"}


def test_the_readme_walks_through_the_cluster_with_the_files_own_names(config, readme):
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for placeholder in ("REPLACE_WITH_BUCKET", "REPLACE_WITH_INSTANCE_PROFILE", "REPLACE_WITH_DLAMI_ID"):
        assert placeholder in section, placeholder  # each one explained
    for command in ("ray up ray_cluster.yaml", "ray exec ray_cluster.yaml --tmux", "ray attach ray_cluster.yaml --tmux",
                    "ray attach ray_cluster.yaml -p 5000 -p 8080", "ray job submit", "ray down ray_cluster.yaml",
                    "optuna-dashboard postgresql+psycopg2:///optuna"):
        assert command in section, command
    # the sweep command there parses with the sweep's own CLI and points at what the YAML starts
    sweep = re.search(r"python -m orchestrator\.sweep (.*?)'", section.replace("\\\n", " "), flags=re.S)[1]
    args = build_parser().parse_args(shlex.split(sweep.replace("$CDL_STORAGE", "s3://bucket/cdl")))
    assert args.address == "auto" and args.tracking_uri == "http://127.0.0.1:5000"
    assert args.optuna_storage == "postgresql+psycopg2:///optuna" and args.storage_path.startswith("s3://")
    assert "CDL_STORAGE" in commands(config, "setup_commands")
