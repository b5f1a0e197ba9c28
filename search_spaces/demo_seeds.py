"""demo_seeds: the CPU demo over 3 seeds — CODA on offline Fashion-MNIST, demo-t -> demo-s, the student alone, logit KD,
D-CDL and CDL-Prompt, each KD cell tuned as in `smoke` with its defaults as its first trial — so that the report's
paired gains (seed by seed against the student alone of that seed, with a 95% interval) say which differences the
demo stream can show at all. Compare tuned with untuned (`report`) and default with default (`report --setting
default`)."""
from dataclasses import replace

from search_spaces.smoke import SPACE as SMOKE

SPACE = replace(SMOKE, name="demo_seeds", description=__doc__, methods=["coda"], kd_methods=["kd", "dcdl", "cdl_prompt"], seeds=[0, 1, 2])
