"""Per-cell Optuna search that really prunes.

Ray's OptunaSearch hard-codes Optuna's NopPruner, and with ASHA stopped trials land in Optuna as COMPLETE
with partial values. Here every cell has its own Optuna study (TPE by default) in one storage; a Tune
`Searcher` asks the cell's study for each new trial, and a Tune scheduler reports every task's validation
accuracy (as the area under the accuracy curve so far, see SweepSpace.prune_on) to that trial and stops it
when the space's Optuna pruner says so — so a trial is compared only with trials of its own cell, and
pruned trials are recorded as PRUNED.
"""
from __future__ import annotations

import logging
import pickle
from collections import Counter
from typing import Any

import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.space import Cell, SweepSpace

log = logging.getLogger(__name__)


class CellStudies:
    """One Optuna study per cell, named `<sweep>/<cell key>`, in one storage (sqlite file or RDB URL)."""

    def __init__(self, space: SweepSpace, sweep: str, storage_url: str) -> None:
        self.space = space
        self.sweep = sweep
        self.storage_url = storage_url
        self._storage: optuna.storages.BaseStorage | None = None  # one engine and cache for every cell's study
        self._studies: dict[str, optuna.Study] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles searchers; database engines do not pickle
        return self.__dict__ | {"_storage": None, "_studies": {}}

    def name(self, cell: Cell) -> str:
        return f"{self.sweep}/{cell.key}"

    def study(self, cell: Cell) -> optuna.Study:
        if cell.key not in self._studies:
            if self._storage is None:
                self._storage = optuna.storages.get_storage(self.storage_url)
            study = optuna.create_study(
                study_name=self.name(cell), storage=self._storage, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=self.space.sampler_seed), pruner=self.space.build_pruner(),
            )
            if study.trials:  # a resumed driver: a sampler seeded as before would replay the settings already tried
                study.sampler = optuna.samplers.TPESampler(seed=self.space.sampler_seed + len(study.trials))
            self._studies[cell.key] = study
        return self._studies[cell.key]


class PerCellOptunaSearch(Searcher):
    """Hands out trials cell by cell (breadth first) from each cell's Optuna study and tells the outcome."""

    def __init__(self, space: SweepSpace, studies: CellStudies) -> None:
        super().__init__(metric=space.metric, mode="max")
        self.space = space
        self.studies = studies
        self.cells = {cell.key: cell for cell in space.cells()}
        # Once, not per suggest: trials_for calls `tune` (a probe per cell), and suggest runs for every trial.
        self.quota = {key: space.trials_for(cell) for key, cell in self.cells.items()}
        self.assigned: dict[str, tuple[str, int]] = {}  # Tune trial id -> (cell key, Optuna trial number)
        self.pruned: dict[str, int] = {}  # Tune trial id -> task after which it was pruned
        self._live: dict[str, optuna.Trial] = {}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_live": {}}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if trial_id in self.assigned:  # restored experiment re-asking for a known trial
            return None
        asked = Counter(key for key, _ in self.assigned.values())
        open_cells = [c for c in self.cells.values() if asked[c.key] < self.quota[c.key]]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda c: asked[c.key])  # breadth first: every cell gets a trial early
        study = self.studies.study(cell)
        trial = self._orphan(study, cell) or study.ask()
        overrides = self.space.tune(trial, cell) if self.space.tune else {}
        trial.set_user_attr("tune_trial_id", trial_id)
        self.assigned[trial_id] = (cell.key, trial.number)
        self._live[trial_id] = trial
        return {"run": self.space.run_config(cell, overrides), "cell": cell.key, "tuned": dict(trial.params),
                "optuna_trial": trial.number, "optuna_study": self.studies.name(cell)}

    def _orphan(self, study: optuna.Study, cell: Cell) -> optuna.Trial | None:
        """An Optuna trial asked for a Tune trial that a killed driver never recorded (Tune's last snapshot predates
        it): it is given to the next Tune trial of its cell, which replays its values, instead of leaving it
        RUNNING forever next to a new one."""
        numbers = {number for key, number in self.assigned.values() if key == cell.key}
        for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen.number not in numbers:
                log.info("replaying Optuna trial %d of %s, started before the driver restarted", frozen.number, cell.key)
                return optuna.trial.Trial(study, frozen._trial_id)
        return None

    def _trial(self, trial_id: str) -> optuna.Trial:
        if trial_id not in self._live:  # after a driver restart: rebuild the handle from the storage
            key, number = self.assigned[trial_id]
            study = self.studies.study(self.cells[key])
            self._live[trial_id] = optuna.trial.Trial(study, study.trials[number]._trial_id)
        return self._live[trial_id]

    def should_prune(self, trial_id: str, task: int, n_tasks: int, value: float) -> bool:
        """Report the trial's pruning signal (`space.prune_on`) after `task`; True if its cell's pruner stops it."""
        if trial_id not in self.assigned:
            return False
        if trial_id in self.pruned:  # pruned before a driver restart, then restored from its last checkpoint
            return True
        trial = self._trial(trial_id)
        if self.studies.study(self.cells[self.assigned[trial_id][0]]).trials[trial.number].state.is_finished():
            # an errored trial restarted by --resume: Optuna recorded it FAIL and cannot reopen it
            return False
        trial.report(value, step=task)
        if task < n_tasks and trial.should_prune():
            self.pruned[trial_id] = task
            log.info("pruning %s (%s) after task %d/%d at %s=%.2f", trial_id, self.assigned[trial_id][0], task, n_tasks, self.space.prune_on, value)
            return True
        return False

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.assigned:
            return
        key, number = self.assigned[trial_id]
        study = self.studies.study(self.cells[key])
        # skip_if_finished: already told before a driver restart (and no read of the whole study to find out)
        if trial_id in self.pruned:
            study.tell(number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        elif error or not result or self.metric not in result:
            study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        else:
            study.tell(number, result[self.metric], skip_if_finished=True)
        self._live.pop(trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"assigned": self.assigned, "pruned": self.pruned}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.assigned, self.pruned = state["assigned"], state["pruned"]


class OptunaPruningScheduler(FIFOScheduler):
    """Tune scheduler that stops a trial when its cell's Optuna pruner prunes it (after each task)."""

    def __init__(self, searcher: PerCellOptunaSearch) -> None:
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        signal = self.searcher.space.prune_on
        if signal in result and self.searcher.should_prune(trial.trial_id, result["task"], result["n_tasks"], result[signal]):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE
