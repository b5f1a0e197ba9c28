"""Which task checkpoints the sweep keeps (orchestrator.checkpoints): a finished trial's older ones go, but only
once two experiment snapshots have begun since it finished and 30 s have passed (or at the sweep's last, awaited
snapshot); a running trial keeps all of its own. Fake trials on a real folder and a fake clock; the sweep e2e test
checks the same through Tune."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ray import tune

from orchestrator.checkpoints import UPLOAD_GRACE_S, CheckpointPruner


def trial_with_checkpoints(root: Path, trial_id: str, tasks: int) -> SimpleNamespace:
    trial_dir = root / f"train_cdl_{trial_id}"
    for index in range(tasks):
        (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
        (trial_dir / f"checkpoint_{index:06d}" / "run_state.pt").write_bytes(b"state")
    (trial_dir / "result.json").write_text("{}\n")
    latest = tune.Checkpoint(str(trial_dir / f"checkpoint_{tasks - 1:06d}"))
    return SimpleNamespace(trial_id=trial_id, checkpoint=latest, dir=trial_dir)


def kept(trial: SimpleNamespace) -> list[str]:
    return sorted(path.name for path in trial.dir.iterdir())


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_finished_trial_keeps_only_its_latest_checkpoint_after_two_snapshots_and_the_upload_grace(tmp_path):
    clock = Clock()
    pruner = CheckpointPruner(clock)
    finished, running = trial_with_checkpoints(tmp_path, "a", 4), trial_with_checkpoints(tmp_path, "b", 3)
    everything = kept(finished)
    pruner.on_trial_complete(0, [], finished)
    clock.now += UPLOAD_GRACE_S / 3
    pruner.get_state()  # the snapshot recording it finished is being written: it may not be on storage yet
    assert kept(finished) == everything
    clock.now += UPLOAD_GRACE_S / 3
    pruner.get_state()  # a second one, but the first one's upload may still be under way
    assert kept(finished) == everything
    clock.now += UPLOAD_GRACE_S / 3
    pruner.get_state()
    assert kept(finished) == ["checkpoint_000003", "result.json"]
    assert (finished.dir / "checkpoint_000003" / "run_state.pt").read_bytes() == b"state"
    assert kept(running) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "result.json"]
    assert pruner.pruned == 3
    pruner.get_state()  # pruned once: later snapshots leave it be
    assert kept(finished) == ["checkpoint_000003", "result.json"] and pruner.pruned == 3


def test_the_sweep_end_prunes_trials_its_last_snapshot_recorded_finished(tmp_path):
    pruner = CheckpointPruner()
    recorded, unrecorded = trial_with_checkpoints(tmp_path, "a", 3), trial_with_checkpoints(tmp_path, "b", 3)
    pruner.on_trial_complete(0, [], recorded)
    pruner.get_state()  # Tune's final snapshot, awaited before on_experiment_end
    pruner.on_trial_complete(0, [], unrecorded)  # finished after it (a sweep that ended on an error)
    pruner.on_experiment_end([])
    assert kept(recorded) == ["checkpoint_000002", "result.json"]
    assert kept(unrecorded) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "result.json"]


def test_a_trial_that_never_checkpointed_is_left_alone(tmp_path):
    pruner = CheckpointPruner()
    pruner.on_trial_complete(0, [], SimpleNamespace(trial_id="c", checkpoint=None))
    pruner.get_state(), pruner.get_state()
    assert pruner.pruned == 0
