"""paper: one untuned trial per row of the CDL paper's table (v1 project page), with the paper's defaults:
CODA L->B and B->S, L2P and DualPrompt B->T, and the no-teacher rows of each student, on Split CIFAR-100 and
ImageNet-R; CDL-Prompt with a = 0.5, T = 2; the official protocol (all training data, no validation split)."""
from orchestrator.space import SweepSpace

L, B, S, T = (f"vit_{size}_patch16_224" for size in ("large", "base", "small", "tiny"))
ROWS = {  # (teacher, student, method) of the published table
    (L, B, "coda"), (B, S, "coda"), (B, T, "l2p"), (B, T, "dualprompt"),
    (None, B, "coda"), (None, S, "coda"), (None, T, "l2p"), (None, T, "dualprompt"),
}

SPACE = SweepSpace(
    name="paper",
    description=__doc__,
    pairs=[(L, B), (B, S), (B, T), (None, B), (None, S), (None, T)],
    methods=["l2p", "dualprompt", "coda"],
    kd_methods=["cdl_prompt"],
    datasets=["cifar100", "imagenet_r"],
    seeds=[0],
    keep=lambda cell: (cell.teacher, cell.student, cell.method) in ROWS,
    tune=lambda trial, cell: {"train.batch_size": 32} if cell.teacher == L else {},
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
