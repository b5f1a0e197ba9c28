"""Teachers shared across a sweep's trials, and `python -m orchestrator.teachers` to list and prune the store.

Trials that need the same teacher (same `cdl_core.learner.teacher_key`) find it in the teacher store
(`cdl_core.teacher_store`). The first trial that needs a task the store does not hold trains it while holding
a lease on (key, task) from a Ray actor that the sweep driver starts; the others wait for the lease and then
load what it stored, so no two trials train the same teacher task. A lease expires unless its holder renews
it, so a trial killed mid-training (worker lost, trial pruned) frees it for the next one.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from cdl_core.cli import run_cli
from cdl_core.errors import TeacherStoreError

if TYPE_CHECKING:
    from cdl_core.teacher_store import TeacherStore

log = logging.getLogger(__name__)


class LeaseTable:
    """Named, expiring leases (the state of the sweep's lease actor). `clock` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expires at)

    def acquire(self, name: str, holder: str, ttl: float) -> bool:
        current = self.leases.get(name)
        if current is None or current[0] == holder or current[1] <= self.clock():
            self.leases[name] = (holder, self.clock() + ttl)
            return True
        return False

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        """Extend a lease this holder still has; False when it expired and someone else took it."""
        current = self.leases.get(name)
        if current is None or current[0] != holder:
            return False
        self.leases[name] = (holder, self.clock() + ttl)
        return True

    def release(self, name: str, holder: str) -> None:
        if self.leases.get(name, ("",))[0] == holder:
            del self.leases[name]

    def held(self) -> dict[str, str]:
        now = self.clock()
        return {name: holder for name, (holder, expires) in self.leases.items() if expires > now}


def start_lease_actor(name: str):
    """The sweep's lease actor (0 CPUs, so it never takes a trial's slot), on the driver's node (the head): it lives
    as long as the driver, whichever worker node is lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(LeaseTable).options(name=name, get_if_exists=True, scheduling_strategy=here).remote()


@dataclass(frozen=True)
class TeacherSharing:
    """What a trial needs to share teachers: the store's location and the lease actor's name."""

    store: str
    lease_actor: str
    lease_ttl: float = 60.0
    poll_seconds: float = 0.5

    @contextlib.contextmanager
    def lock(self, name: str, holder: str | None = None) -> Iterator[None]:
        """Hold the lease `name` (wait while another holder has it), renewing it in the background. A trial
        passes its Tune trial id as `holder`, so when Tune restarts it after its worker died, it takes back
        its own lease at once instead of waiting for it to expire."""
        import ray

        actor = ray.get_actor(self.lease_actor)
        holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        waited = 0.0
        while not ray.get(actor.acquire.remote(name, holder, self.lease_ttl)):
            if waited == 0.0:
                log.info("waiting for %s: another trial is training that teacher task or computing its signals", name)
            time.sleep(self.poll_seconds)
            waited += self.poll_seconds
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_ttl / 3):
                if not ray.get(actor.renew.remote(name, holder, self.lease_ttl)):
                    log.warning("lease on teacher %s expired while this trial trained it; another trial may train it too", name)
                    return

        renewer = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            ray.get(actor.release.remote(name, holder))


# -- CLI ------------------------------------------------------------------------------------------------------
# The store's module (cdl_core.teacher_store) imports torch: it is imported here, in the CLI, and not at the top,
# because every trial unpickles its TeacherSharing from this module (1.6 s and ~500 MB per trial process that
# would not otherwise import torch, as the sweep overhead benchmark's no-op trials showed).
def describe_entry(store: TeacherStore, key: str) -> dict[str, Any]:
    entry = store.entry(key)
    manifest = entry.manifest() or {}
    identity, facts = manifest.get("identity", {}), manifest.get("facts", {})
    files = entry.files()
    done = entry.committed()
    n_tasks = int(facts.get("n_tasks", 0)) or None
    stray = [i.base_name for i in entry.stray()]
    return {
        "key": key,
        "teacher": identity.get("teacher", {}).get("preset", "?"),
        "method": identity.get("prompt", {}).get("method", "?"),
        "dataset": identity.get("data", {}).get("name", "?"),
        "seed": identity.get("train", {}).get("seed", "?"),
        "tasks": len(done), "n_tasks": n_tasks,
        "status": "no manifest" if not manifest else "complete" if n_tasks and len(done) >= n_tasks else "partial",
        "stray": stray,
        "bytes": entry.size_bytes(),
        "modified": max((i.mtime.timestamp() for i in files if i.mtime is not None), default=0.0),
    }


def print_entries(rows: list[dict[str, Any]]) -> None:
    print(f"{'key':<24} {'teacher':<22} {'method':<10} {'dataset':<13} {'seed':>4} {'tasks':>7} {'status':<11} {'MB':>8}  modified")
    for r in rows:
        tasks = f"{r['tasks']}/{r['n_tasks'] or '?'}"
        stray = f" (+{len(r['stray'])} stray)" if r["stray"] else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"])) if r["modified"] else "-"
        print(f"{r['key']:<24} {r['teacher']:<22} {r['method']:<10} {r['dataset']:<13} {r['seed']!s:>4} {tasks:>7} "
              f"{r['status'] + stray:<11} {r['bytes'] / 1e6:>8.1f}  {when}")
    print(f"{len(rows)} teachers, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.teachers", description="List and prune a teacher store.")
    p.add_argument("--store", default="ray_results/teachers",
                   help="the store: a directory or URI (default ray_results/teachers, the sweep's default)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="one line per stored teacher: what it is, tasks stored, size")
    prune = sub.add_parser("prune", help="delete stored teachers (do not run while a sweep uses the store)")
    prune.add_argument("--key", nargs="+", default=[], help="these entries")
    prune.add_argument("--partial", action="store_true", help="entries with fewer tasks stored than the stream has")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries not written for this many days")
    prune.add_argument("--stray", action="store_true",
                       help="only the temporary and uncommitted files that killed writers left (entries stay; with --key only theirs)")
    prune.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    return p


def prune(store: TeacherStore, args: argparse.Namespace) -> int:
    if not (args.key or args.partial or args.older_than is not None or args.stray):
        raise TeacherStoreError("prune needs a selection: --key K..., --partial, --older-than DAYS or --stray")
    keys = store.keys()
    unknown = sorted(set(args.key) - set(keys))
    if unknown:
        raise TeacherStoreError(f"no teacher {', '.join(unknown)} in {store.location}; see `list` for the stored keys")
    rows = [describe_entry(store, key) for key in keys]
    if args.stray:
        for row in rows if not args.key else [r for r in rows if r["key"] in args.key]:
            if row["stray"]:
                print(f"{'would remove' if args.dry_run else 'removed'} {len(row['stray'])} stray files from {row['key']}")
                if not args.dry_run:
                    store.entry(row["key"]).clean()
        return 0
    cutoff = time.time() - 86400 * args.older_than if args.older_than is not None else None
    chosen = [r for r in rows if r["key"] in args.key or (args.partial and r["status"] != "complete")
              or (cutoff is not None and r["modified"] < cutoff)]
    for row in chosen:
        if not args.dry_run:
            store.remove(row["key"])
        print(f"{'would remove' if args.dry_run else 'removed'} {row['key']} ({row['teacher']} {row['method']} "
              f"{row['dataset']} seed {row['seed']}, {row['tasks']}/{row['n_tasks'] or '?'} tasks, {row['bytes'] / 1e6:.1f} MB)")
    print(f"{len(chosen)} of {len(rows)} teachers {'would be ' if args.dry_run else ''}removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    from cdl_core.teacher_store import TeacherStore

    args = build_parser().parse_args(argv)
    store = TeacherStore(args.store)
    if args.command == "list":
        print_entries([describe_entry(store, key) for key in store.keys()])
        return 0
    return prune(store, args)


if __name__ == "__main__":
    sys.exit(main())
