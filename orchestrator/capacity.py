"""Whether a sweep's trials can run on the cluster it joined: on the nodes that are up, or on the nodes its
autoscaler can add.

Right after `ray up` a cluster is its head alone (0 CPUs in ray_cluster.yaml); `ray.cluster_resources()` shows
no worker until the autoscaler has started one, and it starts one only for demand it sees. So the check reads the
autoscaler's node types from its cluster config and refuses only when no node that is up and no node type it can
add holds one trial; otherwise the sweep starts, says it is waiting, and asks the autoscaler for the sweep's
concurrency at once (`request_resources`), instead of the one pending trial at a time Tune's searcher-driven
loop would show it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SweepError

# Where `ray up` leaves the cluster config on the head (the autoscaler reads its node types from there).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]  # one node's; empty when the config leaves them to detection at launch
    max_workers: int  # nodes of this type the autoscaler may add


@dataclass(frozen=True)
class Fit:
    """How a sweep starts: at once on nodes that are up, or waiting for the autoscaler (`waiting` says so)."""
    waiting: str | None
    request: int  # trials to ask the autoscaler room for at once; 0: ask nothing
    concurrency: int = 1  # trials that can run at once, on the nodes up and those the autoscaler can add

    @property
    def pending_trials(self) -> int:
        """Trials Tune should keep placed ahead: each trial's placement and process start then overlaps the ones
        running, instead of following the trial before it (Tune keeps one pending for a searcher of its own)."""
        return 2 * max(self.concurrency, 1)


def trial_demand(cpus: float, gpus: float) -> dict[str, float]:
    return {name: amount for name, amount in (("CPU", cpus), ("GPU", gpus)) if amount > 0}


def describe(resources: dict[str, float]) -> str:
    shown = [f"{resources.get(name, 0):g} {name}" for name in ("CPU", "GPU")]
    return ", ".join(shown)


def trials_per_node(resources: dict[str, float], demand: dict[str, float]) -> int:
    """How many trials of `demand` one node of `resources` holds at once."""
    if not demand:
        return 1 << 30
    return min(math.floor(resources.get(name, 0) / amount + 1e-9) for name, amount in demand.items())


def node_types(config: dict[str, Any]) -> list[NodeType]:
    """The worker node types a cluster config lets the autoscaler add (the head is up already, or not at all)."""
    cap = int(config.get("max_workers", 1 << 30))
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        # The head's type adds nodes only where it says so: Ray's local provider has one type for the head and
        # the listed servers, with max_workers = their number.
        limit = min(int(spec.get("max_workers", 0 if name == head else cap)), cap)
        types.append(NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()}, limit))
    return [t for t in types if t.name != head or t.max_workers > 0]


def monitor_config(gcs_address: str, proc: Path = Path("/proc")) -> Path | None:
    """The --autoscaling-config of the autoscaler monitor serving `gcs_address`, when it runs on this machine (the
    head: where `ray up` runs the sweep's driver)."""
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended, or is not ours to read
            continue
        if not any(arg.endswith("monitor.py") for arg in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                return Path(arg.split("=", 1)[1]).expanduser()
    return None


def find_autoscaling_config(explicit: str | None, gcs_address: str) -> Path | None:
    """The cluster config to read node types from: --cluster-config, else the one this cluster's autoscaler was
    started with, else the file `ray up` leaves on the head."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SweepError(f"--cluster-config {explicit}: no such file; pass the cluster YAML the autoscaler runs with "
                             f"(on a head started by `ray up`: {BOOTSTRAP_CONFIG})")
        return path
    found = monitor_config(gcs_address)
    if found is not None and found.is_file():
        return found
    bootstrap = BOOTSTRAP_CONFIG.expanduser()
    return bootstrap if bootstrap.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"cannot read the cluster config {path} ({type(err).__name__}); pass a readable --cluster-config") from None
    if not isinstance(config, dict) or not isinstance(config.get("available_node_types"), dict):
        raise SweepError(f"the cluster config {path} has no available_node_types; pass the cluster YAML given to `ray up`")
    return config


def plan_fit(space_name: str, demand: dict[str, float], live: list[dict[str, float]], types: list[NodeType] | None,
             trials: int, max_concurrent: int) -> Fit:
    """Start now, wait for the autoscaler, or refuse (SweepError) when no node up and no node type holds a trial.
    `types` None: no autoscaling config was found (a fixed cluster, or a driver away from the head)."""
    live_room = sum(trials_per_node(node, demand) for node in live if trials_per_node(node, demand) >= 1)
    fits_live = live_room > 0
    addable = [t for t in types or [] if t.max_workers > 0]
    fitting = [t for t in addable if trials_per_node(t.resources, demand) >= 1]
    undeclared = [t for t in addable if not t.resources]
    wanted = min(trials, max_concurrent or trials)
    if fitting:
        room = sum(t.max_workers * min(trials_per_node(t.resources, demand), trials) for t in fitting)
        request = min(wanted, room + live_room)
        if fits_live:
            return Fit(None, request, request)
        needed = min(fitting, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
        return Fit(f"waiting for the autoscaler: {trials} trials pending, each needs {describe(demand)}, which node type "
                   f"{needed.name!r} holds ({describe(needed.resources)} a node, up to {needed.max_workers} nodes); "
                   "`ray status` shows the nodes it adds", request, request)
    if fits_live:
        return Fit(None, 0, min(wanted, live_room))
    if undeclared:
        return Fit(f"waiting for the autoscaler: {trials} trials pending, each needs {describe(demand)}; node types "
                   f"{', '.join(repr(t.name) for t in undeclared)} declare no resources, so whether one holds a trial "
                   "shows only once it starts: watch `ray status`", 0, min(wanted, sum(t.max_workers for t in undeclared)))
    if addable:
        largest = max(addable, key=lambda t: (t.resources.get("GPU", 0), t.resources.get("CPU", 0)))
        raise SweepError(
            f"space {space_name!r} cannot run on this cluster: a trial asks for {describe(demand)}, and neither a node "
            f"that is up nor a node type the autoscaler can add holds it (the largest type, {largest.name!r}, has "
            f"{describe(largest.resources)}); add a node type that does, or lower the request with --cpus-per-trial / --gpus-per-trial"
        )
    largest_node = max(live, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
    raise SweepError(
        f"space {space_name!r} cannot run here: a trial asks for {describe(demand)} on one node but the largest node "
        f"has {describe(largest_node)}. Join a cluster that has them (--address; where an autoscaler adds nodes, run the "
        "sweep on its head or pass --cluster-config), or lower the request with --cpus-per-trial / --gpus-per-trial"
    )


def cluster_fit(space_name: str, cpus: float, gpus: float, trials: int, max_concurrent: int,
                cluster_config: str | None) -> Fit:
    """`plan_fit` on the Ray cluster this process has joined."""
    import ray

    live = [{k: float(v) for k, v in node["Resources"].items()} for node in ray.nodes() if node["Alive"]]
    gcs_address = ray.get_runtime_context().gcs_address
    path = find_autoscaling_config(cluster_config, gcs_address)
    types = node_types(read_config(path)) if path is not None else None
    return plan_fit(space_name, trial_demand(cpus, gpus), live, types, trials, max_concurrent)


def request_room(fit: Fit, cpus: float, gpus: float) -> None:
    """Ask the autoscaler for room for `fit.request` trials at once (persistent until cleared: `release_room`)."""
    if fit.request:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[trial_demand(cpus, gpus) or {"CPU": 0}] * fit.request)


def release_room(fit: Fit) -> None:
    """Drop the sweep's request, so the autoscaler can retire idle nodes after it."""
    if fit.request:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
