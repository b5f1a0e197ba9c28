"""full: every method on a GPU cluster — L->B, B->S, B->T and the no-teacher baselines, L2P / DualPrompt /
CODA-Prompt / APT, logit KD / DKD / FitNets / ReviewKD / DeiT token / D-CDL / CDL-Prompt, Split CIFAR-100 and
ImageNet-R, 3 seeds, Optuna over each method's weights and sizes."""
from orchestrator.space import SweepSpace

L, B, S, T = (f"vit_{size}_patch16_224" for size in ("large", "base", "small", "tiny"))
MAPPING_COMPONENTS = {"coda": 100, "l2p": 30, "dualprompt": 10}
DEPTH = 12  # every student's blocks (ViT-B, -S, -Ti): D-CDL's KD prompts fit in layers 0..11


def tune(trial, cell):
    overrides = {"train.batch_size": 32} if cell.teacher == L else {}  # ViT-L teacher: batch 32 as in the paper
    if cell.method == "apt":
        # The student's ema is tuned; the teacher keeps the official one, so one stored teacher serves every trial.
        overrides["prompt.params.ema"] = trial.suggest_float("ema", 0.3, 0.95)
        if cell.teacher:
            overrides["prompt.teacher_params"] = {"ema": 0.7}
    if cell.kd == "none":
        return overrides
    overrides["distill.alpha"] = trial.suggest_float("alpha", 0.1, 0.9)
    overrides["distill.temperature"] = trial.suggest_float("temperature", 1.0, 8.0, log=True)
    if cell.kd == "dkd":
        overrides["distill.params.non_target_weight"] = trial.suggest_float("non_target_weight", 1.0, 8.0)
    if cell.kd == "fitnets":
        overrides["distill.params.feature_weight"] = trial.suggest_float("feature_weight", 0.01, 1.0, log=True)
    if cell.kd == "reviewkd":
        overrides["distill.params.feature_weight"] = trial.suggest_float("feature_weight", 0.02, 2.0, log=True)
    if cell.kd == "dcdl":
        overrides["distill.params.layers"] = trial.suggest_int("kd_layers", 1, DEPTH)
        overrides["distill.params.length"] = trial.suggest_int("kd_length", 2, 12, step=2)
    if cell.kd == "cdl_prompt":
        m = MAPPING_COMPONENTS[cell.method]
        overrides["distill.params.active_components"] = trial.suggest_int("active_components", max(1, m // 10), m, log=True)
        overrides["distill.params.length"] = trial.suggest_categorical("mapping_length", [4, 8, 20])
    return overrides


SPACE = SweepSpace(
    name="full",
    description=__doc__,
    pairs=[(L, B), (B, S), (B, T), (None, B), (None, S), (None, T)],
    methods=["l2p", "dualprompt", "coda", "apt"],
    kd_methods=["kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt"],
    datasets=["cifar100", "imagenet_r"],
    seeds=[0, 1, 2],
    keep=lambda cell: not (cell.kd == "cdl_prompt" and cell.method == "apt"),  # APT has no prefix prompts to map
    tune=tune,
    trials_per_cell=8,
    per_dataset={"cifar100": {"train.epochs": 20}, "imagenet_r": {"train.epochs": 35}},
    base={"train.num_workers": 4, "data.val_fraction": 0.1},  # official protocol + a validation split to tune on
    cpus_per_trial=4,
    gpus_per_trial=1,
    pruner="median",
    pruner_args={"n_startup_trials": 3, "n_warmup_steps": 3},
)
