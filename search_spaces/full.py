"""full: the paper's grid on a GPU cluster — L->B, B->S, B->T and the no-teacher baselines, L2P / DualPrompt /
CODA-Prompt, logit KD / DKD / CDL-Prompt, Split CIFAR-100 and ImageNet-R, 3 seeds, Optuna over the prompt
mapping and the KD weights."""
from orchestrator.space import SweepSpace

L, B, S, T = (f"vit_{size}_patch16_224" for size in ("large", "base", "small", "tiny"))
MAPPING_COMPONENTS = {"coda": 100, "l2p": 30, "dualprompt": 10}


def tune(trial, cell):
    overrides = {"train.batch_size": 32} if cell.teacher == L else {}  # ViT-L teacher: batch 32 as in the paper
    if cell.kd == "none":
        return overrides
    overrides["distill.alpha"] = trial.suggest_float("alpha", 0.1, 0.9)
    overrides["distill.temperature"] = trial.suggest_float("temperature", 1.0, 8.0, log=True)
    if cell.kd == "dkd":
        overrides["distill.params.non_target_weight"] = trial.suggest_float("non_target_weight", 1.0, 8.0)
    if cell.kd == "cdl_prompt":
        m = MAPPING_COMPONENTS[cell.method]
        overrides["distill.params.active_components"] = trial.suggest_int("active_components", max(1, m // 10), m, log=True)
        overrides["distill.params.length"] = trial.suggest_categorical("mapping_length", [4, 8, 20])
    return overrides


SPACE = SweepSpace(
    name="full",
    description=__doc__,
    pairs=[(L, B), (B, S), (B, T), (None, B), (None, S), (None, T)],
    methods=["l2p", "dualprompt", "coda"],
    kd_methods=["kd", "dkd", "cdl_prompt"],
    datasets=["cifar100", "imagenet_r"],
    seeds=[0, 1, 2],
    tune=tune,
    trials_per_cell=8,
    per_dataset={"cifar100": {"train.epochs": 20}, "imagenet_r": {"train.epochs": 35}},
    base={"train.num_workers": 4, "data.val_fraction": 0.1},  # official protocol + a validation split to tune on
    cpus_per_trial=4,
    gpus_per_trial=1,
    pruner="median",
    pruner_args={"n_startup_trials": 3, "n_warmup_steps": 3},
)
