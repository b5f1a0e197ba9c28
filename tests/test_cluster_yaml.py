"""The cluster files, `ray_cluster.yaml` (AWS) and `ray_cluster_local.yaml` (the lab's own servers, Ray's `local`
provider), go through Ray's own cluster-config preparation and schema validation (what `ray up` does before it
touches a machine), start the same head services, and hold what the README's cluster walkthrough relies on.
Nothing here starts a cluster."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from ray.autoscaler._private.command_runner import _with_interactive
from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.sweep import build_parser

ROOT = Path(__file__).resolve().parents[1]
INSTALL = '~/venv/bin/pip install -q -e "$HOME/cdl[cluster]"'


@dataclass(frozen=True)
class ClusterFile:
    name: str
    home: str  # the nodes' home directory, as the file_mounts name it
    storage: str  # CDL_STORAGE on the nodes: Tune results, the teacher store, MLflow's artifacts
    placeholders: frozenset[str]
    readme_commands: tuple[str, ...]


AWS = ClusterFile(
    "ray_cluster.yaml", "/home/ubuntu", "s3://REPLACE_WITH_BUCKET/cdl",
    frozenset({"REPLACE_WITH_BUCKET", "REPLACE_WITH_INSTANCE_PROFILE", "REPLACE_WITH_DLAMI_ID"}),
    ("ray up ray_cluster.yaml", "ray exec ray_cluster.yaml --tmux", "ray attach ray_cluster.yaml --tmux",
     "ray attach ray_cluster.yaml -p 5000 -p 8080", "ray job submit", "ray down ray_cluster.yaml",
     "optuna-dashboard postgresql+psycopg2:///optuna"))
LAB = ClusterFile(
    "ray_cluster_local.yaml", "~", "REPLACE_WITH_SHARED_DIR/cdl",
    frozenset({"REPLACE_WITH_HEAD_IP", "REPLACE_WITH_WORKER_IP_1", "REPLACE_WITH_WORKER_IP_2", "REPLACE_WITH_SSH_USER",
               "REPLACE_WITH_SSH_KEY", "REPLACE_WITH_SHARED_DIR"}),
    ("ray up ray_cluster_local.yaml", "ray exec ray_cluster_local.yaml 'ray status'", "ray down ray_cluster_local.yaml"))


def raw_config(spec: ClusterFile) -> dict:
    return yaml.safe_load((ROOT / spec.name).read_text())


def prepared_config(raw: dict) -> dict:
    prepared = prepare_config(raw)
    validate_config(prepared)  # raises on anything the schema rejects
    return prepared


@pytest.fixture(scope="module", params=[AWS, LAB], ids=lambda spec: spec.name)
def cluster(request) -> tuple[ClusterFile, dict]:
    return request.param, prepared_config(raw_config(request.param))


@pytest.fixture(scope="module")
def config() -> dict:
    return prepared_config(raw_config(AWS))


@pytest.fixture(scope="module")
def lab() -> dict:
    return prepared_config(raw_config(LAB))


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text()


def commands(config: dict, key: str) -> str:
    return "\n".join(config[key])


def ray_start_flags(config: dict, key: str) -> dict[str, str]:
    line = next(line for line in config[key] if "ray start" in line)
    words = shlex.split(line.split("ray start", 1)[1])
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


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


def test_the_lab_cluster_is_a_fixed_list_of_servers_reached_over_ssh(lab):
    raw = raw_config(LAB)
    assert lab["provider"]["type"] == "local" and "coordinator_address" not in lab["provider"]
    assert lab["provider"]["head_ip"] == "REPLACE_WITH_HEAD_IP"
    assert lab["provider"]["worker_ips"] == ["REPLACE_WITH_WORKER_IP_1", "REPLACE_WITH_WORKER_IP_2"]
    assert lab["auth"] == {"ssh_user": "REPLACE_WITH_SSH_USER", "ssh_private_key": "REPLACE_WITH_SSH_KEY"}
    # Ray makes one node type for the head and every server, resources detected by Ray when each joins, and
    # keeps every listed server in the cluster: the list is the only thing to edit.
    assert lab["head_node_type"] == LOCAL_CLUSTER_NODE_TYPE and list(lab["available_node_types"]) == [LOCAL_CLUSTER_NODE_TYPE]
    node_type = lab["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]
    assert node_type["resources"] == {}
    assert node_type["min_workers"] == node_type["max_workers"] == lab["max_workers"] == 2
    assert not {"min_workers", "max_workers", "available_node_types", "head_node_type"} & set(raw)
    three = prepared_config({**raw, "provider": {**raw["provider"], "worker_ips": [*raw["provider"]["worker_ips"], "10.0.0.3"]}})
    assert three["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]["min_workers"] == three["max_workers"] == 3
    # why the file declares no worker resources: the local provider refuses node types
    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config({**raw, "available_node_types": {"gpu": {"node_config": {}, "resources": {"CPU": 8, "GPU": 2}}}})


def test_no_trial_lands_on_the_head(cluster):
    spec, config = cluster
    head = ray_start_flags(config, "head_start_ray_commands")
    if spec is LAB:
        # the local provider passes no node-type resources to `ray start`: the head's flags say it
        assert head["--num-cpus"] == "0" and head["--num-gpus"] == "0"
        worker = ray_start_flags(config, "worker_start_ray_commands")
        assert not {"--num-cpus", "--num-gpus", "--resources"} & set(worker)  # detected on each server
    else:
        assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0


def test_every_node_installs_this_project_with_its_pinned_dependencies(cluster, tmp_path):
    spec, config = cluster
    assert config["file_mounts"][f"{spec.home}/cdl"] == "."
    setup = commands(config, "setup_commands")
    # pyproject.toml pins torch, ray, mlflow, optuna; its `cluster` extra holds the PostgreSQL driver
    assert INSTALL in setup
    assert "python3.11 -m venv ~/venv" in setup
    worker_setup = commands(config, "worker_setup_commands")
    assert INSTALL in worker_setup  # prepare_config merges the common setup into each node's
    # what pip receives from the node's shell: the checkout's own path with the extra (pip expands no `~`)
    pip_args = subprocess.run(["bash", "-c", "printf '%s\\n' " + INSTALL.split("pip install", 1)[1]], cwd=tmp_path,
                              env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                              capture_output=True, text=True, check=True).stdout.splitlines()
    assert pip_args == ["-q", "-e", f"{tmp_path}/cdl[cluster]"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg2-binary==") for req in extras["cluster"])
    assert "cdl-sweeps[cluster]" in extras["test"]  # `make setup` installs it too: tests/test_postgres_services.py


def test_the_head_runs_mlflow_on_localhost_over_postgresql_and_has_the_optuna_database(cluster):
    spec, config = cluster
    head_setup = commands(config, "head_setup_commands")
    for needed in ("apt-get install -yq postgresql", "createdb mlflow", "createdb optuna", "optuna-dashboard"):
        assert needed in head_setup, needed
    start = commands(config, "head_start_ray_commands")
    server = next(line for line in config["head_start_ray_commands"] if "mlflow server --" in line)
    args = shlex.split(server.split(">")[0].replace("nohup", ""))
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "5000"
    assert args[args.index("--backend-store-uri") + 1] == "postgresql+psycopg2:///mlflow"
    assert args[args.index("--artifacts-destination") + 1].startswith(f"{spec.storage}/")
    assert "ray start --head" in start and "--dashboard-host=127.0.0.1" in start
    assert "ray start --address=$RAY_HEAD_IP:6379" in commands(config, "worker_start_ray_commands")
    assert f"export CDL_STORAGE={spec.storage}'" in commands(config, "setup_commands")


def test_a_restarted_head_stops_its_old_mlflow_server_but_not_the_shell_ray_runs_that_in(cluster, tmp_path):
    """`pkill -f PATTERN` matches whole command lines, and Ray runs each command as `bash --login -c -i '<the
    command>'` over SSH: a pattern that matches its own command line kills that shell, and `ray up` stops with
    "Start command failed". Probed with pgrep (same matching, kills nothing) in the shells Ray would use."""
    spec, config = cluster
    server = next(line for line in config["head_start_ray_commands"] if "mlflow server --" in line)
    stops = [line for line in config["head_start_ray_commands"] if "pkill" in line]
    assert len(stops) == 1
    words = shlex.split(stops[0])
    assert re.search(words[words.index("-f") + 1], server), stops[0]  # it does stop the server
    probe = "echo shell=$$; " + stops[0].replace("pkill", "pgrep", 1)
    ssh_side = subprocess.Popen(["bash", "-c", " ".join(_with_interactive(probe))], cwd=tmp_path, text=True,
                                env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = ssh_side.communicate(timeout=30)[0].split()
    shells = {str(ssh_side.pid), next(word for word in out if word.startswith("shell="))[len("shell="):]}
    assert not shells & set(out), f"{spec.name}: {stops[0]!r} kills the shell that runs it"


def test_the_lab_nodes_check_that_they_share_the_heads_storage(lab, tmp_path):
    shared, elsewhere = tmp_path / "nfs", tmp_path / "local-disk"
    shared.mkdir()
    elsewhere.mkdir()

    def run(line: str, directory: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line.replace("REPLACE_WITH_SHARED_DIR", str(directory))],
                              capture_output=True, text=True)

    head = [line for line in lab["head_setup_commands"] if ".cluster-head" in line]
    worker = [line for line in lab["worker_setup_commands"] if ".cluster-head" in line]
    assert len(head) == 1 and len(worker) == 1
    assert run(head[0], shared).returncode == 0
    assert run(worker[0], shared).returncode == 0  # a worker that mounts the head's shared directory
    refused = run(worker[0], elsewhere)  # one where the path is a directory of its own
    assert refused.returncode != 0 and "is not the head's shared directory" in refused.stdout


def test_every_node_starts_ray_with_token_authentication_and_the_launchers_token(cluster, readme):
    spec, config = cluster
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(line for line in config[key] if "ray start" in line)
        assert start.startswith("export RAY_AUTH_MODE=token;"), key
    assert config["file_mounts"][f"{spec.home}/.ray/auth_token"] == "~/.ray/auth_token"
    assert "ray get-auth-token --generate" in readme


def test_the_file_holds_placeholders_not_credentials(cluster):
    spec, _ = cluster
    text = (ROOT / spec.name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    assert not re.search(r"(?<![\d.])\d{12}(?![\d.])", text)  # account ids
    assert not re.search(r"(?i)(secret|password|access_key)\w*\s*[:=]", text)  # no key: value credentials
    assert not re.search(r"\bami-[0-9a-f]{8,}", text)  # a real, region-bound AMI id
    assert set(re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", text)) <= {"127.0.0.1"}  # no real machine's address
    assert set(re.findall(r"REPLACE_WITH_[A-Z0-9_]*[A-Z0-9]", text)) == spec.placeholders


def test_the_readme_walks_through_the_cluster_with_the_files_own_names(cluster, readme):
    spec, config = cluster
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for placeholder in spec.placeholders:
        assert placeholder in section, placeholder  # each one explained
    for command in spec.readme_commands:
        assert command in section, command
    assert "CDL_STORAGE" in commands(config, "setup_commands")
    if spec is AWS:
        # the sweep command there parses with the sweep's own CLI and points at what the YAML starts
        sweep = re.search(r"python -m orchestrator\.sweep (.*?)'", section.replace("\\\n", " "), flags=re.S)[1]
        args = build_parser().parse_args(shlex.split(sweep.replace("$CDL_STORAGE", "s3://bucket/cdl")))
        assert args.address == "auto" and args.tracking_uri == "http://127.0.0.1:5000"
        assert args.optuna_storage == "postgresql+psycopg2:///optuna" and args.storage_path.startswith("s3://")
