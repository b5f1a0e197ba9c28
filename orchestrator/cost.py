"""What a sweep will cost, before it runs: GPU-hours estimated from FLOP counts and an assumed GPU throughput.

These are estimates, not measurements. Replace them with your own numbers: set SUSTAINED_TFLOPS to what your GPU
sustains, or put measured milliseconds per image for a pair in MEASURED_MS (e.g. from `python
bench/step_throughput.py --pair TEACHER STUDENT --device cuda --batch-size 64`: 1000 / its "ours img/s" is the
student step's ms per image); a measured entry replaces the FLOP estimate for that pair and role.

The model, per image (F_X: one forward pass of backbone X in multiply-adds, FORWARD_GMACS; 2 FLOPs each):
- a training step of frozen-backbone prompt tuning is a forward and a backward through the activations (the frozen
  weights get no gradients): 2 F_X;
- prompt methods that select prompts (L2P, DualPrompt, CODA; not APT) add the frozen query pass, a forward of the
  student-size backbone (`query: own`: the model's own) to every training step and every evaluated image;
- a student step with a teacher adds the frozen teacher's no-grad forward F_T; at evaluation only a method that
  maps the teacher's prompts at test time (cdl_prompt) adds it again;
- evaluation is one forward (plus the query pass).
Per run: (training images - validation) x epochs training steps (each task's images once per epoch), and after task
t the test and validation images of tasks 1..t: (T + 1) / 2 times each split's images over T tasks. A teacher is
trained (and evaluated after each task) once per distinct teacher key with reuse, else once per trial.
Not counted: prompt tokens (a few percent of a sequence), data loading and augmentation, the [CLS]-only last block,
frozen outputs reused across epochs without augmentation, and trials a pruner stops early (so for a pruned space
the estimate is an upper bound). Tuned values are taken from one random draw per cell.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cdl_core.catalog.datasets import DATASETS
from cdl_core.catalog.distill import KD_PARAMS
from cdl_core.catalog.presets import BackbonePreset, get_preset
from cdl_core.catalog.prompts import PROMPT_PARAMS

# Forward GMACs (multiply-adds, the figure DeiT's Table 1 and timm call "GFLOPs") of one prompt-free 224-px image.
# Other presets (the demo ones) use vit_gmacs(), the same count from their shape; it gives these four within 4%.
FORWARD_GMACS = {
    "vit_large_patch16_224": 61.6,
    "vit_base_patch16_224": 17.6,
    "vit_small_patch16_224": 4.6,
    "vit_tiny_patch16_224": 1.3,
}
# An assumption, not a measurement: the FLOP/s a training or evaluation pass sustains on the reference GPU; fp32 (the
# default train.precision) about a third of its 31 TFLOP/s fp32 peak, bf16 autocast assumed three times that.
REFERENCE_GPU = "one NVIDIA A10G (the g5 nodes of ray_cluster.yaml)"
SUSTAINED_TFLOPS = {"fp32": 10.0, "bf16": 30.0}  # by train.precision
# Measured ms per image, (teacher or None, student) -> {"student_step", "student_eval", "teacher_step", "teacher_eval"};
# an entry replaces the estimate of that pair and role. Empty: nothing here was measured on a GPU.
MEASURED_MS: dict[tuple[str | None, str], dict[str, float]] = {}
# (training, test) images of the full datasets; a run's train_per_class / test_per_class (or the dataset's default
# per-class count) x classes replaces them.
DATASET_IMAGES = {"cifar100": (50_000, 10_000), "imagenet_r": (24_000, 6_000), "fashion_mnist": (60_000, 10_000)}


def vit_gmacs(preset: BackbonePreset) -> float:
    """Forward multiply-adds of a ViT from its shape: per block 12 N D^2 (qkv, projection, 4x MLP) + 2 N^2 D
    (attention scores and mixing) over N tokens of width D, plus the patch embedding."""
    n, d = preset.tokens, preset.embed_dim
    patch_embedding = (n - 1) * 3 * preset.patch_size ** 2 * d
    return (preset.depth * (12 * n * d * d + 2 * n * n * d) + patch_embedding) / 1e9


def forward_gmacs(preset: str) -> float:
    return FORWARD_GMACS.get(preset) or vit_gmacs(get_preset(preset))


def image_gmacs(cfg: dict[str, Any], role: str) -> tuple[float, float]:
    """(training step, evaluated image) multiply-adds per image for `role` (student or teacher) of a run config."""
    student, teacher = cfg["student"]["preset"], (cfg["teacher"] or {}).get("preset")
    own = teacher if role == "teacher" else student
    query = forward_gmacs(student if cfg["query"] == "student" else own) if PROMPT_PARAMS[cfg["prompt"]["method"]].uses_query else 0.0
    step, evaluation = 2 * forward_gmacs(own) + query, forward_gmacs(own) + query
    if role == "student" and teacher:
        step += forward_gmacs(teacher)
        if KD_PARAMS[cfg["distill"]["method"]].needs_teacher_prompts:  # maps the teacher's prompts at test time too
            evaluation += forward_gmacs(teacher)
    return step, evaluation


def image_ms(cfg: dict[str, Any], role: str) -> tuple[float, float]:
    """(training step, evaluated image) milliseconds per image on the reference GPU: measured if MEASURED_MS has them."""
    tflops = SUSTAINED_TFLOPS[cfg["train"]["precision"]]
    estimated = [gmacs * 2e9 / (tflops * 1e12) * 1e3 for gmacs in image_gmacs(cfg, role)]
    measured = MEASURED_MS.get(((cfg["teacher"] or {}).get("preset"), cfg["student"]["preset"]), {})
    return measured.get(f"{role}_step", estimated[0]), measured.get(f"{role}_eval", estimated[1])


def run_images(cfg: dict[str, Any]) -> tuple[float, float]:
    """(training image-steps, evaluated images) of one model over a run's whole stream."""
    data, info = cfg["data"], DATASETS[cfg["data"]["name"]]
    n_tasks = info.n_tasks(data["n_tasks"])
    full = DATASET_IMAGES.get(info.name, (None, None))
    train, test = (
        min(per_class * info.n_classes, whole or per_class * info.n_classes) if per_class else whole
        for per_class, whole in ((data["train_per_class"] or info.default_train_per_class, full[0]),
                                 (data["test_per_class"] or info.default_test_per_class, full[1]))
    )
    val = train * data["val_fraction"]
    return (train - val) * cfg["train"]["epochs"], (test + val) * (n_tasks + 1) / 2


def run_hours(cfg: dict[str, Any], role: str) -> float:
    """Reference-GPU hours of training and evaluating `role` over a run's stream."""
    (steps, evaluated), (step_ms, eval_ms) = run_images(cfg), image_ms(cfg, role)
    return (steps * step_ms + evaluated * eval_ms) / 1e3 / 3600


@dataclass
class PairCost:
    pair: str  # "teacher -> student" or "student alone"
    trials: int = 0
    teacher_trainings: int = 0
    student_hours: float = 0.0
    teacher_hours: float = 0.0

    @property
    def hours(self) -> float:
        return self.student_hours + self.teacher_hours


def estimate(space: Any, plan: Any, reuse: bool = True) -> list[PairCost]:
    """GPU-hours per (teacher, student) pair of a planned sweep (orchestrator.plan.Plan): every trial's student, and
    its teachers once per distinct teacher key (reuse) or once per trial."""
    pairs: dict[str, PairCost] = {}
    trained: set[str] = set()
    for cell in plan.cells:
        cfg = plan.configs.get(cell.key) or space.run_config(cell, space.sample_overrides(cell))
        trials = plan.trials[cell.key]
        name = f"{cell.teacher} -> {cell.student}" if cell.teacher else f"{cell.student} alone"
        row = pairs.setdefault(name, PairCost(name))
        row.trials += trials
        row.student_hours += trials * run_hours(cfg, "student")
        if not cell.teacher:
            continue
        key = plan.teacher_keys.get(cell.key) if reuse else None  # None: this cell's trials train their own
        trainings = trials if key is None else int(key not in trained)
        if key is not None:
            trained.add(key)
        row.teacher_trainings += trainings
        row.teacher_hours += trainings * run_hours(cfg, "teacher")
    return list(pairs.values())


def estimate_lines(space: Any, plan: Any, reuse: bool = True) -> list[str]:
    """The dry run's cost lines: a total and a per-pair breakdown, or why there is no GPU estimate."""
    if space.gpus_per_trial <= 0:
        return ["GPU-hours: none estimated, the space asks for no GPU (its trials run on CPUs, where per-trial overheads "
                "that a FLOP count misses dominate; the README gives the smoke sweep's measured time)"]
    rows = estimate(space, plan, reuse)
    precisions = sorted({(plan.configs.get(c.key) or space.run_config(c))["train"]["precision"] for c in plan.cells})
    assumed = ", ".join(f"{p} at {SUSTAINED_TFLOPS[p]:g} TFLOP/s" for p in precisions)
    lines = [
        f"estimated GPU-hours: {sum(r.hours for r in rows):,.0f} on {REFERENCE_GPU}, {assumed} assumed sustained"
        + ("; measured ms per image for some pairs" if MEASURED_MS else ""),
        "  an estimate from FLOP counts, not a measurement (orchestrator/cost.py says how; README: what a sweep costs):",
        "  every trial runs to its end, " + ("each distinct teacher trains once" if reuse else "every trial trains its teacher"),
        f"  {'pair':<48} {'trials':>6} {'teachers':>8} {'student h':>10} {'teacher h':>10} {'GPU-hours':>10}",
    ]
    for r in rows:
        lines.append(f"  {r.pair:<48} {r.trials:>6} {r.teacher_trainings:>8} {r.student_hours:>10,.1f} {r.teacher_hours:>10,.1f} {r.hours:>10,.1f}")
    return lines
