"""What the frozen-signal cache saves a sweep: 1 stored teacher and 6 students (logit KD and DKD at two alphas,
D-CDL, the DeiT token), each student trained twice in one process, side by side: computing its frozen signals
(the query pass and the teacher's forward) in every step, and reading them from the teacher store, where the
first student of the cached side stores them. Prints the CPU-seconds per student trial each way (the cached side's
mean includes the first student's computing), their ratio, and checks that both ways give the same students.

The teacher is trained once beforehand (not timed); both sides load it from the store.

Training dominates a trial at the paper's settings (Split CIFAR-100: 500 training and 100 test images a class, 20
epochs); the demo default keeps that balance at a bench's size (300 and 50 a class, 3 epochs), since evaluation
(which reads no teacher and computes each split's queries once per run) is the same either way.

    python bench/signal_cache.py            # fashion_mnist, demo-t -> demo-s (demo weights), CODA, 3 epochs
    python bench/signal_cache.py --paper    # ViT-B -> ViT-S at 224 px, random weights, a small synthetic stream
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch

from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.learner import ContinualRun

STUDENTS = [("kd", 0.3), ("kd", 0.7), ("dkd", 0.3), ("dkd", 0.7), ("dcdl", 0.5), ("deit", 0.5)]


def config(args: argparse.Namespace, kd: str, alpha: float, cached: bool) -> RunConfig:
    if args.paper:
        pair, weights = ("vit_base_patch16_224", "vit_small_patch16_224"), "random"
        data = DataConfig(name="synthetic", n_tasks=2, train_per_class=args.train_per_class or 2, test_per_class=1)
    else:
        pair, weights = ("demo-t", "demo-s"), "default"
        data = DataConfig(name="fashion_mnist", train_per_class=args.train_per_class or 300, test_per_class=50)
    return RunConfig(
        data=data, student=BackboneConfig(pair[1], weights), teacher=BackboneConfig(pair[0], weights),
        prompt=PromptConfig(args.method), distill=DistillConfig(kd, alpha=alpha),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device="cpu", signal_cache_max_gb=8.0 if cached else 0.0),
    ).validate()


def student(cfg: RunConfig, store: str) -> tuple[float, dict, ContinualRun]:
    torch.manual_seed(0)  # random-weight backbones follow the global RNG: the same weights every run
    start = time.process_time()
    run = ContinualRun(cfg, teacher_store=store)
    results = run.run()
    return time.process_time() - start, results["matrices"]["student"], run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="ViT-B -> ViT-S at 224 px with random weights")
    p.add_argument("--method", default="coda", choices=["coda", "l2p", "dualprompt", "apt"])
    p.add_argument("--epochs", type=int, default=None, help="default 3 (demo), 2 (--paper)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16 (demo), 5 (--paper)")
    p.add_argument("--train-per-class", type=int, default=None, help="default 300 (demo), 2 (--paper)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-seconds not inflated by spinning)")
    args = p.parse_args()
    args.batch_size = args.batch_size or (5 if args.paper else 16)
    args.epochs = args.epochs or (2 if args.paper else 3)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as store:
        start = time.process_time()
        student(config(args, "kd", 0.5, cached=False), store)  # trains and stores the teacher
        print(f"teacher trained and stored once: {time.process_time() - start:.1f} CPU-s (not counted below)")
        online, cached, same = [], [], []
        for kd, alpha in STUDENTS:
            seconds_online, matrices_online, _ = student(config(args, kd, alpha, cached=False), store)
            seconds_cached, matrices_cached, run = student(config(args, kd, alpha, cached=True), store)
            online.append(seconds_online)
            cached.append(seconds_cached)
            same.append(matrices_online == matrices_cached)
            computed = f"computed {len(run.trainer.signals.computed)} tasks' signals" if run.trainer.signals.computed else "read them"
            print(f"  {kd:<5} alpha {alpha:.1f}: online {seconds_online:7.1f} CPU-s, cached {seconds_cached:7.1f} CPU-s ({computed}), "
                  f"same accuracies: {same[-1]}", flush=True)
    pair = "ViT-B -> ViT-S (random weights, 224 px)" if args.paper else "demo-t -> demo-s (fashion_mnist)"
    print(f"\n{pair}, {args.method}, {args.epochs} epochs, batch {args.batch_size}, {args.threads} thread(s), 6 students of 1 teacher")
    print(f"CPU-s per student trial: online {statistics.mean(online):.1f}, from the signal cache {statistics.mean(cached):.1f} "
          f"(readers only {statistics.mean(cached[1:]):.1f}); ratio {statistics.mean(online) / statistics.mean(cached):.2f}x (target >= 2x)")
    if not all(same):
        raise SystemExit("error: a student trained from the cache differs from the same student computing online")


if __name__ == "__main__":
    main()
