"""Compute saved by the teacher store: a small grid of 1 teacher config x 6 student configs, run with and
without reuse in one process, side by side.

Without reuse every student run trains its own teacher (what the official code does); with reuse the first
run trains the teacher into a temporary store and the other five load it task by task. Prints CPU-seconds of
each way, their ratio, and checks that both give the same student results.

    python bench/teacher_reuse.py                       # fashion_mnist, demo-t -> demo-s, CODA
    python bench/teacher_reuse.py --dataset synthetic   # random backbones, no pretraining needed
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.learner import ContinualRun, teacher_key

STUDENT_CONFIGS = [(kd, alpha) for kd in ("kd", "dkd", "cdl_prompt") for alpha in (0.3, 0.7)]


def grid(args: argparse.Namespace) -> list[RunConfig]:
    weights = "random" if args.dataset == "synthetic" else "default"
    return [
        RunConfig(
            data=DataConfig(name=args.dataset, train_per_class=args.train_per_class, test_per_class=args.test_per_class),
            student=BackboneConfig("demo-s", weights), teacher=BackboneConfig("demo-t", weights),
            prompt=PromptConfig(args.method), distill=DistillConfig(kd, alpha=alpha),
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device="cpu", seed=args.seed),
        ).validate()
        for kd, alpha in STUDENT_CONFIGS
    ]


def run_grid(configs: list[RunConfig], store: str | None) -> tuple[float, float, list]:
    cpu, wall = time.process_time(), time.perf_counter()
    matrices = []
    for cfg in configs:
        torch.manual_seed(0)
        matrices.append(ContinualRun(cfg, teacher_store=store).run()["matrices"]["student"]["test"])
    return time.process_time() - cpu, time.perf_counter() - wall, matrices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "synthetic"])
    p.add_argument("--method", default="coda", choices=["coda", "l2p", "dualprompt"])
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-seconds not inflated by spinning)")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # CODA's one-line warning per run would bury the table
    torch.set_num_threads(args.threads)
    configs = grid(args)
    assert len({teacher_key(cfg) for cfg in configs}) == 1, "the grid's student configs must share one teacher"
    ContinualRun(configs[0])  # demo backbones pretrained (once, cached) before timing
    print(f"grid: 1 teacher (demo-t, {args.method}, {args.dataset}) x {len(configs)} student configs "
          f"({', '.join(f'{kd} a={a}' for kd, a in STUDENT_CONFIGS)}); {args.threads} torch thread(s)")
    without_cpu, without_wall, without = run_grid(configs, None)
    with tempfile.TemporaryDirectory() as store:
        with_cpu, with_wall, with_reuse = run_grid(configs, store)
    assert with_reuse == without, "students with a stored teacher must match students with a freshly trained one"
    print(f"{'':<24} {'CPU-seconds':>12} {'wall seconds':>13}")
    print(f"{'without reuse':<24} {without_cpu:>12.1f} {without_wall:>13.1f}   ({len(configs)} teacher trainings)")
    print(f"{'with the teacher store':<24} {with_cpu:>12.1f} {with_wall:>13.1f}   (1 teacher training)")
    print(f"compute ratio without / with reuse: {without_cpu / with_cpu:.2f}x CPU-seconds ({without_wall / with_wall:.2f}x wall); "
          "student results identical")


if __name__ == "__main__":
    main()
