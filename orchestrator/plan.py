"""A sweep's plan, before anything runs: its cells and their trials, the stored teacher each cell's trials share,
and what `--dry-run` prints of it (the teacher trainings with and without reuse, the frozen-signal cache per teacher,
the cost estimate). Also the demo backbones' one pretraining before any trial starts."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from orchestrator.space import Cell, SweepSpace


@dataclass
class Plan:
    cells: list[Cell]
    trials: dict[str, int]  # cell key -> trials
    teacher_keys: dict[str, str]  # cell key -> key of the stored teacher all its trials share
    own_teacher_trials: int  # trials that train a teacher of their own (joint schedule, or tuned teacher settings)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell key -> run config, one draw of its tuned values

    @property
    def total_trials(self) -> int:
        return sum(self.trials.values())

    @property
    def teacher_trainings_without_reuse(self) -> int:
        return sum(self.trials[cell] for cell in self.teacher_keys) + self.own_teacher_trials

    @property
    def teacher_trainings_with_reuse(self) -> int:
        return len(set(self.teacher_keys.values())) + self.own_teacher_trials


def make_plan(space: SweepSpace) -> Plan:
    from cdl_core.config import RunConfig
    from cdl_core.teacher_identity import teacher_key

    cells = space.cells()
    trials = {c.key: space.trials_for(c) for c in cells}
    keys, own, configs = {}, 0, {}
    for cell in cells:
        configs[cell.key] = space.run_config(cell, space.sample_overrides(cell, 0))
        if not cell.teacher:
            continue
        # The teacher key under two different tuned-value draws: equal unless tuning touches the teacher.
        draws = [RunConfig.from_dict(raw) for raw in (configs[cell.key], space.run_config(cell, space.sample_overrides(cell, 1)))]
        drawn = {teacher_key(cfg) for cfg in draws} if draws[0].distill.schedule == "sequential" else set()
        if len(drawn) == 1:
            keys[cell.key] = drawn.pop()
        else:
            own += trials[cell.key]
    return Plan(cells, trials, keys, own, configs)


def print_plan(space: SweepSpace, plan: Plan, teacher_store: str | None) -> None:
    print(f"space {space.name}: {len(plan.cells)} cells, {plan.total_trials} trials")
    print(f"resources per trial: {space.cpus_per_trial:g} CPU, {space.gpus_per_trial:g} GPU; pruner {space.pruner} {space.pruner_args}")
    this = "  <- this sweep"
    own = f"; {plan.own_teacher_trials} trials with a joint-schedule or tuned teacher train their own" if plan.own_teacher_trials else ""
    print(f"teacher trainings without reuse: {plan.teacher_trainings_without_reuse:>6}  (every trial with a teacher trains its own)"
          + ("" if teacher_store else this))
    print(f"teacher trainings with reuse:    {plan.teacher_trainings_with_reuse:>6}  (one per distinct teacher key{own})"
          + (f"{this}, teacher store {teacher_store}" if teacher_store else ""))
    print(f"{'cell':<64} {'trials':>6}  teacher key")
    for cell in plan.cells:
        print(f"{cell.key:<64} {plan.trials[cell.key]:>6}  {plan.teacher_keys.get(cell.key, 'own' if cell.teacher else '-')}")
    print("\n".join(["", *signal_cache_lines(plan, teacher_store)]))
    from orchestrator.cost import estimate_lines

    print("\n".join(["", *estimate_lines(space, plan, reuse=teacher_store is not None)]))


def signal_cache_lines(plan: Plan, teacher_store: str | None) -> list[str]:
    """Per stored teacher: the size of its students' frozen signals in the teacher store, how many of its cells read
    them and which distillation methods compute theirs online (the reasons once, below)."""
    from cdl_core.config import RunConfig
    from cdl_core.signal_plan import signal_cache_plan

    if not plan.teacher_keys:
        return []
    sizes: dict[str, int] = {}
    reading: Counter = Counter()
    online: dict[str, set[str]] = defaultdict(set)
    reasons: set[str] = set()
    for cell, key in plan.teacher_keys.items():
        cfg = RunConfig.from_dict(plan.configs[cell]).validate()
        signal = signal_cache_plan(cfg)
        if signal.online_because:
            online[key].add(cfg.distill.method)
            reasons.add(signal.online_because)
        else:
            sizes[key] = max(sizes.get(key, 0), signal.nbytes)
            reading[key] += 1
    where = "in the teacher store" if teacher_store else "(no --teacher-store: every student computes its signals online)"
    lines = [f"frozen-signal cache per teacher {where}: {sum(sizes.values()):,} bytes for {len(sizes)} teachers",
             f"  {'teacher key':<24} {'bytes':>15} {'cells reading':>13}  computed online"]
    for key in sorted(set(plan.teacher_keys.values())):
        lines.append(f"  {key:<24} {sizes.get(key, 0):>15,} {reading[key]:>13}  {', '.join(sorted(online[key])) or '-'}")
    return lines + [f"  online because: {reason}" for reason in sorted(reasons)]


def prepare_backbones(space: SweepSpace) -> None:
    """Pretrain the demo backbones the space uses once, here, before trials start — not in every trial at once."""
    from cdl_core.catalog.presets import demo_weights_path, uses_demo_pretraining
    from cdl_core.pretrain import ensure_demo_weights

    needed = set()
    for cell in space.cells():
        cfg = space.run_config(cell)
        for backbone in (cfg["student"], cfg["teacher"]):
            if backbone and uses_demo_pretraining(backbone["preset"], backbone["weights"]):
                needed.add(backbone["preset"])
    for name in sorted(needed):
        if not demo_weights_path(name).is_file():
            print(f"pretraining the demo backbone {name} once (a few minutes on 2 cores; cached at {demo_weights_path(name)})", flush=True)
        ensure_demo_weights(name)
