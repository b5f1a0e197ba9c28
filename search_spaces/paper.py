"""paper: one untuned trial per published cell of the CDL authors' boards (orchestrator/paper_results.csv) — the
current leaderboard (L2P, DualPrompt, CODA-Prompt, APT x ViT-B -> ViT-S, ViT-L -> ViT-B x student alone, logit KD,
DKD, FitNets, ReviewKD, DeiT token, D-CDL) and the v1 board (CDL-Prompt, ViT-B -> ViT-Tiny), on Split CIFAR-100
and ImageNet-R, with the paper's settings: each method's official defaults (a = 0.5, its own T), 20 / 35 epochs,
batch 64 (32 with a ViT-L teacher), the official protocol (all training data, no validation split).

The v1 board's ViT-L rows (its teachers alone) are not cells: the L -> B cells train those very teachers (once
each, shared through the teacher store; their runs are tagged role=teacher), and a ViT-L student alone would
select prompts with a ViT-L query, unlike them."""
import csv
from importlib import resources

from orchestrator.space import SweepSpace

L, B, S, T = (f"vit_{size}_patch16_224" for size in ("large", "base", "small", "tiny"))


def published_cells() -> set[tuple]:
    """(teacher or None, student, method, kd, dataset) of every published number, either board."""
    with resources.files("orchestrator").joinpath("paper_results.csv").open() as file:
        rows = csv.DictReader(line for line in file if not line.startswith("#"))
        return {(None if r["teacher"] == "none" else r["teacher"], r["student"], r["method"], r["kd"], r["dataset"]) for r in rows}


CELLS = {cell for cell in published_cells() if cell[:2] != (None, L)}  # without the teachers alone (above)


def axis(i: int) -> list[str]:
    return sorted({cell[i] for cell in CELLS} - {"none"})


SPACE = SweepSpace(
    name="paper",
    description=__doc__,
    pairs=sorted({cell[:2] for cell in CELLS}, key=lambda pair: (pair[0] is None, pair)),  # the students alone last
    methods=axis(2),
    kd_methods=axis(3),
    datasets=axis(4),
    seeds=[0],
    keep=lambda cell: (cell.teacher, cell.student, cell.method, cell.kd, cell.dataset) in CELLS,
    tune=lambda trial, cell: {"train.batch_size": 32} if cell.teacher == L else {},  # the paper's batch with ViT-L
    per_dataset={"cifar100": {"train.epochs": 20}, "imagenet_r": {"train.epochs": 35}},
    base={"train.num_workers": 4},
    cpus_per_trial=4,
    gpus_per_trial=1,
    pruner="none",
    pruner_args={},
    # The official protocol: no validation split, every training image trains; nothing is chosen here, so the
    # summary is ordered by test accuracy.
    metric="test_avg_acc",
)
