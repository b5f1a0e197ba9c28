"""The lease scenarios of tests/test_teacher_store.py, each run as its own Ray driver in a fresh process:
`python tests/lease_scenarios.py lock|killed DIR` prints one JSON line with what happened.

A separate driver because these scenarios kill Ray workers, and a driver whose local Ray node shuts down after
that can exit at once (seen in CI: pytest gone with exit 1 and no summary); and a fresh one because Ray's
per-process state left by earlier tests' drivers must not decide these results."""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import ray

from orchestrator.teachers import TeacherSharing, start_lease_actor


def hold(sharing: TeacherSharing) -> tuple[float, float, float, int]:
    asked = time.time()
    with sharing.lock("k/task_0"):
        start = time.time()
        time.sleep(0.4)
        end = time.time()
    return asked, start, end, os.getpid()


def die_holding(sharing: TeacherSharing, marker: str) -> None:
    with sharing.lock("k/task_0"):
        Path(marker).write_text(repr(time.time()))
        os._exit(1)


def acquire(sharing: TeacherSharing) -> float:
    with sharing.lock("k/task_0"):
        return time.time()


def lock(actor, name: str, directory: Path) -> dict:
    """Four holders on two workers, one lease."""
    sharing = TeacherSharing(store="unused", lease_actor=name, lease_ttl=30.0, poll_seconds=0.02)
    ray.get([ray.remote(num_cpus=1)(lambda: None).remote() for _ in range(2)], timeout=120)  # start both workers
    results = ray.get([ray.remote(num_cpus=1, max_retries=0)(hold).remote(sharing) for _ in range(4)], timeout=120)
    return {"results": results, "held": ray.get(actor.held.remote())}


def killed(actor, name: str, directory: Path, ttl: float = 2.0) -> dict:
    """A holder killed while it holds the lease, then another asks for it."""
    sharing = TeacherSharing(store="unused", lease_actor=name, lease_ttl=ttl, poll_seconds=0.02)
    marker = directory / "acquired"
    try:
        ray.get(ray.remote(num_cpus=1, max_retries=0)(die_holding).remote(sharing, str(marker)), timeout=120)
        died = False
    except ray.exceptions.RayError:
        died = True
    # in a worker, so that a lease that never frees fails the test instead of hanging it
    acquired = ray.get(ray.remote(num_cpus=1, max_retries=0)(acquire).remote(sharing), timeout=60)
    return {"died": died, "dead_acquired": float(marker.read_text()), "acquired": acquired, "ttl": ttl,
            "held": ray.get(actor.held.remote())}


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    name = f"test-leases-{uuid.uuid4().hex}"
    actor = start_lease_actor(name)
    print(json.dumps({"lock": lock, "killed": killed}[scenario](actor, name, directory)), flush=True)
    ray.shutdown()
