"""What a sweep varies: the grid of cells, the Optuna-tuned parameters per trial, resources and pruner.

A space is a short module in `search_spaces/` exposing `SPACE = SweepSpace(...)`. The grid axes are fixed
combinations (each one a *cell*: teacher, student, prompt method, KD method, dataset, seed); the tuned
parameters are define-by-run: `tune(trial, cell)` asks an Optuna trial for values and returns RunConfig
overrides as dotted keys (e.g. {"distill.alpha": 0.3}), so conditional parameters are plain code.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from cdl_core.catalog.datasets import DATASETS
from cdl_core.catalog.distill import KD_PARAMS
from cdl_core.catalog.presets import PRESETS
from cdl_core.catalog.prompts import PROMPT_PARAMS
from cdl_core.config import RunConfig
from cdl_core.errors import ConfigError
from orchestrator.errors import SpaceError


@dataclass(frozen=True)
class Cell:
    teacher: str | None  # None: the no-teacher baseline (student alone)
    student: str
    method: str
    kd: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.teacher or 'none'}-{self.student}.{self.method}.{self.kd}.{self.dataset}.s{self.seed}"

    def tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()} | {"cell": self.key}


PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "patient": lambda patience=1, min_delta=0.0, **inner: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(**inner), patience=patience, min_delta=min_delta
    ),
    "none": optuna.pruners.NopPruner,
}


@dataclass
class SweepSpace:
    name: str
    description: str
    pairs: list[tuple[str | None, str]]  # (teacher, student); (None, student) is the student-alone baseline
    methods: list[str]
    kd_methods: list[str]  # for pairs with a teacher; the baseline pairs always use "none"
    datasets: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    tune: Callable[[optuna.Trial, Cell], dict[str, Any]] | None = None
    keep: Callable[[Cell], bool] | None = None  # optional filter on the grid (e.g. only the paper's rows)
    trials_per_cell: int = 1
    base: dict[str, Any] = field(default_factory=dict)  # dotted RunConfig overrides for every trial
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted overrides per dataset
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    pruner: str = "median"
    pruner_args: dict[str, Any] = field(default_factory=lambda: {"n_warmup_steps": 2})
    sampler_seed: int = 0
    # Tuning and pruning read the validation split only, never test accuracy. An untuned space without a validation
    # split (the official protocol trains on every training image) orders its summary by a test metric instead.
    metric: str = "val_avg_acc"
    # What the pruner sees after each task. Optuna's median/percentile pruners compare a trial's *best*
    # intermediate value with the others' values at the current step, and accuracy over all seen classes falls
    # as tasks arrive, so its best is always task 1's. The area under the accuracy curve so far only grows:
    # its best is its current value, and trials are compared on the tasks learned so far.
    prune_on: str = "val_acc_area"

    def cells(self) -> list[Cell]:
        cells = []
        for (teacher, student), method, dataset, seed in itertools.product(self.pairs, self.methods, self.datasets, self.seeds):
            for kd in (self.kd_methods if teacher else ["none"]):
                cell = Cell(teacher, student, method, kd, dataset, seed)
                if self.keep is None or self.keep(cell):
                    cells.append(cell)
        return cells

    def trials_for(self, cell: Cell) -> int:
        """Untuned cells (e.g. the student-alone baseline with nothing to tune) need only one trial."""
        return self.trials_per_cell if self.tunes(cell) else 1

    def tunes(self, cell: Cell) -> bool:
        return bool(self.sample_overrides(cell))

    def sample_overrides(self, cell: Cell, seed: int = 0) -> dict[str, Any]:
        """What `tune` returns for one throwaway trial (values drawn at random with `seed`)."""
        return self.tune(_probe_trial(seed), cell) if self.tune is not None else {}

    def default_params(self, cell: Cell) -> dict[str, Any]:
        """The Optuna parameters `tune` asks for in `cell`, each at the run's default for the setting it sets: the
        first trial of every tuned cell (enqueued) runs the methods' defaults, the baseline its tuned trials beat."""
        if self.tune is None:
            return {}
        try:
            overrides = self.tune(_ParamNames(), cell)
        except TypeError as err:  # arithmetic on a suggestion
            raise SpaceError(f"space {self.name!r}, cell {cell.key}: tune computes a setting from a suggested value ({err}); return "
                             "each suggested value as the setting itself, so its default can be the cell's first trial") from None
        config = RunConfig.from_dict(self.run_config(cell)).validate()
        defaults = {value.name: _default_setting(config, dotted) for dotted, value in overrides.items() if isinstance(value, _Asked)}
        return {name: value for name, value in defaults.items() if value is not None}  # None: no default to give; sampled

    def build_pruner(self) -> optuna.pruners.BasePruner:
        return PRUNERS[self.pruner](**self.pruner_args)

    def run_config(self, cell: Cell, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The validated RunConfig dict of one trial of `cell`."""
        raw = RunConfig().to_dict()
        raw["student"] = {"preset": cell.student, "weights": "default"}
        raw["teacher"] = {"preset": cell.teacher, "weights": "default"} if cell.teacher else None
        raw["prompt"]["method"] = cell.method
        raw["distill"]["method"] = cell.kd
        raw["data"]["name"] = cell.dataset
        raw["train"]["seed"] = cell.seed
        for source in (self.base, self.per_dataset.get(cell.dataset, {}), overrides or {}):
            for dotted, value in source.items():
                _set_dotted(raw, dotted, copy.deepcopy(value))
        try:
            return RunConfig.from_dict(raw).to_dict()
        except ConfigError as err:
            raise SpaceError(f"space {self.name!r}, cell {cell.key}: {err}") from None

    def validate(self) -> "SweepSpace":
        def check(kind: str, values: list, valid) -> None:
            bad = [v for v in values if v not in valid]
            if bad:
                raise SpaceError(f"space {self.name!r}: unknown {kind} {bad}; valid: {', '.join(sorted(valid))}")

        if not (self.pairs and self.methods and self.datasets and self.seeds):
            raise SpaceError(f"space {self.name!r}: pairs, methods, datasets and seeds must each list at least one value")
        if not self.cells():
            raise SpaceError(f"space {self.name!r}: its keep filter leaves no cell")
        check("teacher", [t for t, _ in self.pairs if t], PRESETS)
        check("student", [s for _, s in self.pairs], PRESETS)
        check("prompt method", self.methods, PROMPT_PARAMS)
        check("KD method", self.kd_methods, KD_PARAMS)
        check("dataset", self.datasets, DATASETS)
        check("pruner", [self.pruner], PRUNERS)
        if self.trials_per_cell < 1:
            raise SpaceError(f"space {self.name!r}: trials_per_cell={self.trials_per_cell} must be at least 1")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise SpaceError(f"space {self.name!r}: cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if any(t and kd == "none" for (t, _), kd in itertools.product(self.pairs, self.kd_methods)):
            raise SpaceError(f"space {self.name!r}: 'none' in kd_methods duplicates the student-alone pairs; add (None, student) to pairs instead")
        try:
            self.build_pruner()
        except TypeError as err:
            raise SpaceError(f"space {self.name!r}: pruner_args do not fit pruner {self.pruner!r}: {err}") from None
        # every cell must give a valid run config, with tuned values too
        configs = [self.run_config(cell, self.sample_overrides(cell)) for cell in self.cells()]
        for cell in self.cells():
            self.default_params(cell)  # each cell's first trial: its defaults must be enqueueable
        self._check_validation_split(configs)
        return self

    def _check_validation_split(self, configs: list[dict[str, Any]]) -> None:
        """Tuning and pruning choose on the validation split, never on test; a space that has none must not choose."""
        without = [c for c in configs if not c["data"]["val_fraction"]]
        choosing = [why for why, on in ((f"tunes {self.trials_per_cell} trials per cell", self.trials_per_cell > 1),
                                        (f"prunes (pruner={self.pruner!r})", self.pruner != "none")) if on]
        if choosing and without:
            protocol = without[0]["protocol"]
            raise SpaceError(
                f"space {self.name!r} {' and '.join(choosing)} but its runs have no validation split (data.val_fraction=0, "
                f"as protocol {protocol!r} sets it); choosing on test accuracy would leak: set base 'data.val_fraction' (e.g. 0.1)"
            )
        if choosing and not self.metric.startswith("val_"):
            raise SpaceError(f"space {self.name!r} {' and '.join(choosing)} on metric {self.metric!r}; choose on a validation metric (val_...)")
        if without and self.metric.startswith("val_"):
            raise SpaceError(
                f"space {self.name!r}: metric {self.metric!r} needs a validation split but data.val_fraction=0; set "
                "metric='test_avg_acc' (an untuned space chooses nothing) or base 'data.val_fraction'"
            )


def _probe_trial(seed: int = 0) -> optuna.Trial:
    """A throwaway in-memory trial to see what `tune` asks for (validation, planning). A fresh study every time:
    one shared study rejects a parameter name asked with another distribution (in another cell or space),
    which separate per-cell studies allow, and it would keep every probe in memory."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study.ask()


@dataclass(frozen=True)
class _Asked:
    name: str  # the Optuna parameter a setting is set from


class _ParamNames:
    """A stand-in for a cell's first trial (number 0) whose suggest_* return which parameter was asked
    (SweepSpace.default_params); anything else a `tune` reads (number, user_attrs, ...) is a real probe trial's."""

    def __init__(self) -> None:
        self._trial = _probe_trial()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def _asked(self, name: str, *args: Any, **kwargs: Any) -> _Asked:
        return _Asked(name)

    suggest_float = suggest_int = suggest_categorical = suggest_uniform = suggest_loguniform = suggest_discrete_uniform = _asked


def _default_setting(config: RunConfig, dotted: str) -> Any:
    """A setting's value in a validated config, method parameters resolved to their defaults as they run (D-CDL's
    layers capped at the student's depth)."""
    from cdl_core.catalog.distill import resolve_kd_params
    from cdl_core.catalog.presets import get_preset
    from cdl_core.catalog.prompts import resolve_prompt_params

    section, _, rest = dotted.partition(".")
    if section == "distill" and rest.startswith("params."):
        params = resolve_kd_params(config.distill.method, config.distill.params).in_effect(get_preset(config.student.preset).depth)
        name = rest.removeprefix("params.")
        if getattr(params, name) is None and hasattr(params, "resolved"):  # derived from the prompt method (CDL-Prompt's sizes)
            prompt = resolve_prompt_params(config.prompt.method, config.prompt.params)
            return params.resolved(prompt, DATASETS[config.data.name].n_tasks(config.data.n_tasks))[name]
        return getattr(params, name)
    if section == "prompt" and rest.startswith("params."):
        return getattr(resolve_prompt_params(config.prompt.method, config.prompt.params), rest.removeprefix("params."))
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if part in node and node[part] is None:
            return  # a setting for an absent section (e.g. teacher.* in a no-teacher cell) applies to nothing
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpaceError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def available_spaces() -> list[str]:
    import search_spaces

    return sorted(m.name for m in pkgutil.iter_modules(search_spaces.__path__) if not m.name.startswith("_"))


def load_space(name: str) -> SweepSpace:
    """A space by module name in `search_spaces/`, or a path to a copied and edited space file."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise SpaceError(f"space file {path} does not exist")
        module = _import_space_file(path)
    else:
        if name not in available_spaces():
            raise SpaceError(f"unknown space {name!r}; available: {', '.join(available_spaces())} (or a path to a .py file)")
        module = importlib.import_module(f"search_spaces.{name}")
    space = getattr(module, "SPACE", None)
    if not isinstance(space, SweepSpace):
        raise SpaceError(f"space module {name!r} must define SPACE = SweepSpace(...) (see search_spaces/smoke.py)")
    # A copy: callers adjust it (the CLI's resource overrides), and an imported module's SPACE must stay as written.
    return replace(space).validate()


def _import_space_file(path: Path) -> Any:
    """Run a space file as a module; whatever goes wrong while it runs is the file's fault: say where."""
    spec = importlib.util.spec_from_file_location(f"search_space_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise SpaceError(f"space file {path}, line {err.lineno}: {err.msg}; fix the file and rerun") from None
    except Exception as err:  # noqa: BLE001 - the file's own code failed; its traceback's last frame in it says where
        frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path.resolve() or f.filename == str(path)]
        where = f", line {frames[-1].lineno}" if frames else ""
        raise SpaceError(f"space file {path}{where} failed to import: {type(err).__name__}: {err}; fix the file and rerun") from None
    return module
