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

RETRY_OF = "retry_of"  # user attribute of an Optuna trial that continues a failed one of the same Tune trial
SETTING = "setting"  # user attribute of each cell's first trial: "default" (the methods' defaults, enqueued)


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
            study = optuna.create_study(
                study_name=self.name(cell), storage=self.storage, direction="maximize", load_if_exists=True,
                sampler=optuna.samplers.TPESampler(seed=self.space.sampler_seed), pruner=self.space.build_pruner(),
            )
            tried = len(study.get_trials(deepcopy=False))
            if tried:  # a resumed driver: a sampler seeded as before would replay the settings already tried
                study.sampler = optuna.samplers.TPESampler(seed=self.space.sampler_seed + tried)
            self._studies[cell.key] = study
        return self._studies[cell.key]

    def outcomes(self, cell: Cell) -> dict[int, optuna.trial.TrialState]:
        """The state of each Optuna trial of the cell, a retried one's being its latest retry's (see
        PerCellOptunaSearch._retry); one read of the study for all of them."""
        trials = self.study(cell).get_trials(deepcopy=False)
        retries = {t.user_attrs[RETRY_OF]: t.number for t in trials if RETRY_OF in t.user_attrs}

        def latest(number: int) -> int:
            while number in retries:
                number = retries[number]
            return number

        return {t.number: trials[latest(t.number)].state for t in trials}

    def outcome(self, cell: Cell, number: int) -> optuna.trial.TrialState:
        return self.outcomes(cell)[number]

    def state(self, trial: optuna.Trial) -> optuna.trial.TrialState:
        """What the storage holds for this trial now (one row, not the study)."""
        return self.storage.get_trial(trial._trial_id).state

    @property
    def storage(self) -> optuna.storages.BaseStorage:
        if self._storage is None:
            self._storage = optuna.storages.get_storage(self.storage_url)
        return self._storage


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
        self.ended: set[str] = set()  # Tune trial ids told complete or errored
        self.max_concurrent = 0  # 0: no limit
        self._live: dict[str, optuna.Trial] = {}

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_live": {}}

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's max_concurrent_trials, kept here rather than by Tune's ConcurrencyLimiter: the limiter forwards
        the outcome only of trials it suggested itself, so after a --resume the restored trials' outcomes would
        never reach Optuna."""
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if trial_id in self.assigned:  # restored experiment re-asking for a known trial
            return None
        if self.max_concurrent and len(self.assigned.keys() - self.ended) >= self.max_concurrent:
            return None  # asked again once a trial ends
        asked = Counter(key for key, _ in self.assigned.values())
        open_cells = [c for c in self.cells.values() if asked[c.key] < self.quota[c.key]]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda c: asked[c.key])  # breadth first: every cell gets a trial early
        study = self.studies.study(cell)
        trial = self._orphan(study, cell)
        if trial is None:
            if not asked[cell.key] and not study.get_trials(deepcopy=False):
                # A new cell's first trial runs the defaults, so the report can show them beside the tuned best.
                study.enqueue_trial(self.space.default_params(cell), user_attrs={SETTING: "default"})
            trial = study.ask()
        overrides = self.space.tune(trial, cell) if self.space.tune else {}
        trial.set_user_attr("tune_trial_id", trial_id)
        self.assigned[trial_id] = (cell.key, trial.number)
        self._live[trial_id] = trial
        return {"run": self.space.run_config(cell, overrides), "cell": cell.key, "tuned": dict(trial.params),
                "setting": trial.user_attrs.get(SETTING, "tuned"),
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
            self._live[trial_id] = optuna.trial.Trial(study, study.get_trials(deepcopy=False)[number]._trial_id)
        return self._live[trial_id]

    def _retry(self, trial_id: str) -> optuna.Trial:
        """A new Optuna trial with the failed one's values, for its Tune trial resumed after an error (Optuna cannot
        reopen a finished trial); `retry_of` links them, and `CellStudies.outcome` follows the link."""
        key, number = self.assigned[trial_id]
        cell, study = self.cells[key], self.studies.study(self.cells[key])
        failed = study.get_trials(deepcopy=False)[number]
        study.enqueue_trial(failed.params, user_attrs={RETRY_OF: number} | {k: v for k, v in failed.user_attrs.items() if k == SETTING})
        trial = study.ask()
        if self.space.tune:
            self.space.tune(trial, cell)  # define-by-run: suggesting again records the enqueued values as its params
        trial.set_user_attr("tune_trial_id", trial_id)
        self.assigned[trial_id] = (key, trial.number)
        self._live[trial_id] = trial
        log.info("Optuna trial %d of %s failed before its Tune trial was resumed: continued as trial %d", number, key, trial.number)
        return trial

    def should_prune(self, trial_id: str, task: int, n_tasks: int, value: float) -> bool:
        """Report the trial's pruning signal (`space.prune_on`) after `task`; True if its cell's pruner stops it."""
        if trial_id not in self.assigned:
            return False
        if trial_id in self.pruned:  # pruned before a driver restart, then restored from its last checkpoint
            return True
        # Told finished (an errored trial that --resume restarted), or a handle rebuilt after a driver restart: Optuna
        # may have recorded it FAIL. Any other report is of a trial this driver knows running: no read to check.
        maybe_finished = trial_id in self.ended or trial_id not in self._live
        self.ended.discard(trial_id)
        trial = self._trial(trial_id)
        if maybe_finished and self.studies.state(trial).is_finished():
            trial = self._retry(trial_id)
        trial.report(value, step=task)
        if task < n_tasks and trial.should_prune():
            self.pruned[trial_id] = task
            log.info("pruning %s (%s) after task %d/%d at %s=%.2f", trial_id, self.assigned[trial_id][0], task, n_tasks, self.space.prune_on, value)
            return True
        return False

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.assigned:
            return
        self.ended.add(trial_id)
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
            pickle.dump({"assigned": self.assigned, "pruned": self.pruned, "ended": self.ended}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.assigned, self.pruned, self.ended = state["assigned"], state["pruned"], state.get("ended", set())


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
