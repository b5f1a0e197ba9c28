"""One process timing one student step of the CDL code in a source tree, for bench/step_throughput.py --against.

    python bench/step_worker.py TREE SETTINGS_JSON

imports `cdl_core` from TREE (the working tree, or a revision checked out elsewhere), builds a run on a tiny
synthetic stream as after task TASK began, warms the step up, then answers each line "time" on stdin with the
img/s of `steps` steps on stdout, until "quit". Both the working tree's and the revision's steps run in such a
process, so the two are timed alike, alternately, never at the same time. It uses only what the learner has
offered for several revisions: `RunConfig.from_dict`, `ContinualRun`, `begin_task`, the optimizer, `step`.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

TASK = 1  # a task after the first: earlier CODA components are frozen and past classes are masked


def prepare(settings: dict):
    """A run on a tiny synthetic stream (only its class count matters) with the models as after task TASK began,
    and one random batch of the backbones' input size: (run, images, targets, classes). Imports the `cdl_core`
    first on sys.path, so it serves bench/step_throughput.py's working tree and a revision's tree alike."""
    import torch

    from cdl_core.config import RunConfig
    from cdl_core.distill import TaskClasses
    from cdl_core.learner import ContinualRun

    teacher, student = settings["pair"]
    raw = {
        "data": {"name": "synthetic", "n_tasks": 5, "train_per_class": 2, "test_per_class": 1, "val_fraction": 0.0},
        "student": {"preset": student, "weights": "random"}, "prompt": {"method": settings["prompt"]},
        "distill": {"method": settings["kd"]},
        "train": {"device": settings["device"], "precision": settings["precision"], "compile": settings["compile"],
                  "batch_size": settings["batch_size"]},
    }
    if settings["kd"] != "none":
        raw["teacher"] = {"preset": teacher, "weights": "random"}
    run = ContinualRun(RunConfig.from_dict(raw))
    for model in (run.teacher, run.student):
        if model is not None:
            for t in range(TASK + 1):
                model.prompt.begin_task(t)
            model.train()
    task = run.stream.tasks[TASK]
    classes = TaskClasses(past=task.classes[0], seen=task.classes[-1] + 1)
    generator = torch.Generator().manual_seed(0)
    size = run.student_backbone.image_size
    images = torch.randn(settings["batch_size"], 3, size, size, generator=generator).to(run.device)
    targets = torch.randint(classes.past, classes.seen, (settings["batch_size"],), generator=generator).to(run.device)
    return run, images, targets, classes


def build_step(settings: dict):
    import torch

    torch.set_num_threads(settings["threads"])
    run, images, targets, classes = prepare(settings)
    make_optimizer = run.trainer.optimizer if hasattr(run, "trainer") else run._optimizer  # before the learner's split
    optimizer, _ = make_optimizer(run.student)
    synchronize = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)

    def timed() -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(settings["steps"]):
            run.step("student", images, targets, TASK, classes, [optimizer])
        synchronize()
        return settings["steps"] * settings["batch_size"] / (time.perf_counter() - start)

    return timed


def main() -> None:
    tree, settings = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, tree)  # ahead of the editable install's finder, which points at the working tree
    logging.disable(logging.WARNING)  # the methods' warnings about the demo sizes, once per process
    try:
        timed = build_step(settings)
        timed()  # warm-up (and compilation)
    except Exception as err:  # noqa: BLE001 - e.g. a method the revision does not have: the caller prints "-"
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        return
    import cdl_core

    print(json.dumps({"ready": True, "cdl_core": str(Path(cdl_core.__file__).resolve().parent.parent)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        print(json.dumps({"img_per_s": timed()}), flush=True)


if __name__ == "__main__":
    main()
