"""smoke: the whole product on a laptop — demo backbones on offline Fashion-MNIST, all three prompt methods,
student alone / logit KD / D-CDL / CDL-Prompt, a few Optuna trials per KD cell. About 15 minutes on 2 CPU cores."""
from orchestrator.space import SweepSpace

MAPPING_COMPONENTS = {"coda": 100, "l2p": 30, "dualprompt": 10}  # M of each method (the mapping's pool)
DEPTH = 6  # the demo backbones' blocks: D-CDL's KD prompts fit in layers 0..5


def tune(trial, cell):
    if cell.kd == "none":
        return {}  # the student-alone baseline has nothing to tune: one trial
    overrides = {
        "distill.alpha": trial.suggest_float("alpha", 0.1, 0.9),
        "distill.temperature": trial.suggest_float("temperature", 1.0, 4.0, log=True),
    }
    if cell.kd == "cdl_prompt":
        overrides["distill.params.active_components"] = trial.suggest_int("active_components", 1, MAPPING_COMPONENTS[cell.method])
    if cell.kd == "dcdl":
        overrides["distill.params.layers"] = trial.suggest_int("kd_layers", 1, DEPTH)
        overrides["distill.params.length"] = trial.suggest_int("kd_length", 2, 8, step=2)
    return overrides


SPACE = SweepSpace(
    name="smoke",
    description=__doc__,
    pairs=[("demo-t", "demo-s"), (None, "demo-s")],
    methods=["l2p", "dualprompt", "coda"],
    kd_methods=["kd", "dcdl", "cdl_prompt"],
    datasets=["fashion_mnist"],
    seeds=[0],
    tune=tune,
    trials_per_cell=3,
    # 300 train / 100 test images per class keep a trial under a minute; batch 16 gives ~34 optimizer steps per task.
    # Official protocol, with a 10% validation split to tune and prune on (the protocol's own has none).
    base={"train.epochs": 1, "train.batch_size": 16, "data.train_per_class": 300, "data.test_per_class": 100,
          "data.val_fraction": 0.1},
    cpus_per_trial=1,
    pruner="median",
    pruner_args={"n_startup_trials": 1, "n_warmup_steps": 2},
)
