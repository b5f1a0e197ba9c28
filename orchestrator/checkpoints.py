"""Which task checkpoints a sweep keeps: every one of a running trial, only the latest of a finished one.

Why not Tune's `CheckpointConfig(num_to_keep=N)`: Tune then forces a full experiment snapshot (every trial's state,
growing with the sweep) whenever a trial has checkpointed N times since the last one, so that no snapshot names a
deleted checkpoint. With N=2 and a checkpoint per task that is a snapshot every couple of reports, the driver's main
cost past a few hundred trials (bench/sweep_overhead.py). Here Tune keeps every checkpoint and snapshots only on its
own adaptive period; this callback deletes a finished trial's older checkpoints once a snapshot that records the
trial as finished is on storage, so a `--resume` does not restart a trial from a checkpoint that is gone. A running
or errored trial (which `--resume` restarts from its latest) keeps all of its own: at most one per task.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyarrow import fs as pafs
from ray.tune import Callback

# Tune uploads each snapshot in the background and skips an upload while the previous one runs. A trial's older
# checkpoints go once two snapshots have begun since it finished and Tune's own threshold for a slow upload (it warns
# past 30 s) has passed since it finished: the upload of the first of them has had that long.
SNAPSHOTS_BEFORE_PRUNING = 2
UPLOAD_GRACE_S = 30.0


def prune_older_checkpoints(trial: Any) -> int:
    """Delete the trial's checkpoint folders other than its latest, on whatever storage Tune uses; their count."""
    latest = trial.checkpoint
    if latest is None:
        return 0
    trial_dir = latest.path.rsplit("/", 1)[0]
    found = latest.filesystem.get_file_info(pafs.FileSelector(trial_dir))
    older = [info.path for info in found
             if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") and info.path != latest.path]
    for path in older:
        latest.filesystem.delete_dir(path)
    return len(older)


class CheckpointPruner(Callback):
    """Deletes each finished trial's older checkpoints once SNAPSHOTS_BEFORE_PRUNING experiment snapshots have begun
    since it finished and UPLOAD_GRACE_S has passed; at the sweep's end, after its last (awaited) snapshot."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._finished: dict[str, list] = {}  # trial id -> [trial, snapshots begun since it finished, when it finished]
        self.pruned = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finished[trial.trial_id] = [trial, 0, self.clock()]

    def get_state(self) -> None:
        # Tune calls this while it writes each experiment snapshot: the one hook a callback has on snapshots.
        for entry in self._finished.values():
            entry[1] += 1
        now = self.clock()
        self._prune(lambda snapshots, finished_at: snapshots >= SNAPSHOTS_BEFORE_PRUNING and now - finished_at >= UPLOAD_GRACE_S)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # A sweep that ends (or is interrupted) writes a last snapshot and waits for its upload before this call.
        self._prune(lambda snapshots, finished_at: snapshots >= 1)

    def _prune(self, due: Callable[[int, float], bool]) -> None:
        for trial_id, (trial, snapshots, finished_at) in list(self._finished.items()):
            if due(snapshots, finished_at):
                self.pruned += prune_older_checkpoints(trial)
                del self._finished[trial_id]
