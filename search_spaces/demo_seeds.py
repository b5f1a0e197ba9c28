"""demo_seeds: the CPU demo over 3 seeds — CODA on offline Fashion-MNIST, demo-t -> demo-s, the student alone, logit KD,
D-CDL and CDL-Prompt — so that the report's paired gains (seed by seed against the student alone of that seed, with a
95% interval) say which differences the demo stream can show at all. Every cell has the same budget: 3 Optuna trials,
its defaults first. The KD cells tune their KD settings as in `smoke`; the student alone tunes its own knobs, the
step size and the prompts' length (a KD cell cannot tune the step size without losing its shared teacher: the
teacher trains with it). So `report` compares tuned with tuned, and `report --setting default` default with default.
About 10 minutes on 2 CPU cores (9.4 with pruning, 2026-12-02)."""
from dataclasses import replace

from search_spaces.smoke import SPACE as SMOKE
from search_spaces.smoke import tune as tune_kd


def tune(trial, cell):
    if cell.kd != "none":
        return tune_kd(trial, cell)
    return {"train.lr": trial.suggest_float("lr", 3e-4, 3e-3, log=True),
            "prompt.params.length": trial.suggest_int("prompt_length", 4, 12, step=2)}


SPACE = replace(SMOKE, name="demo_seeds", description=__doc__, methods=["coda"], kd_methods=["kd", "dcdl", "cdl_prompt"],
                seeds=[0, 1, 2], tune=tune)
