"""The student distillation step (CDL-Prompt, or logit KD with `--kd kd`): the product's (`ContinualRun.step`)
against the official-style reference (bench/reference_step.py), side by side in one run, for CODA-Prompt, L2P and
DualPrompt.

A step: the frozen query pass, the frozen teacher's forward (prompts and logits), the student's prompted forward
(with the mapped teacher prompts for CDL-Prompt), the loss, backward and the Adam update. First both implementations are checked
to give the same loss and gradients on the same batch and weights; then each runs `--steps` steps per repeat,
alternating, and the table shows the median img/s of each, the median of the per-repeat ratios, the product's
step with its frozen outputs given ("cached": what a student reads from the signal cache, and what every run does
from the second epoch on when augmentation is off), and the
peak memory one training step needs (each measured in a fresh process: peak RSS over two steps minus the RSS
before them on CPU, torch's peak allocation on CUDA). Random weights (speed does not depend on them).

    python bench/step_throughput.py                                  # demo presets demo-t -> demo-s, batch 64, 1 thread
    python bench/step_throughput.py --paper --batch-size 16          # ViT-B -> ViT-S at 224 px (random weights)
    python bench/step_throughput.py --paper --kd kd --table reference  # logit KD: what the signal cache serves
    python bench/step_throughput.py --device cuda --precision bf16 --compile   # on a GPU

A second table times the student step of every (prompt method, distillation method) pair; with `--against REV`
(a git revision, e.g. the commit before a change) each step is timed beside the same step of that revision's
code, alternately, each in its own process (bench/step_worker.py), and the ratio is printed: below 1.00x the
working tree's step is slower.

    python bench/step_throughput.py --table methods --against 764fcfb
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_step import KD_METHODS, OfficialStyleStep, check_same_step  # noqa: E402
from step_worker import TASK, prepare  # noqa: E402

from cdl_core.distill import TaskClasses  # noqa: E402
from cdl_core.learner import ContinualRun  # noqa: E402

METHODS = ("coda", "l2p", "dualprompt")
ALL_PROMPTS = ("coda", "l2p", "dualprompt", "apt")
ALL_KD = ("none", "kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt")
ROOT = Path(__file__).resolve().parent.parent


def build(args: argparse.Namespace, method: str) -> tuple[ContinualRun, torch.Tensor, torch.Tensor, TaskClasses]:
    """The run of `method` and `args.kd` as after task TASK began, with one random batch (step_worker.prepare)."""
    return prepare({"pair": args.pair, "prompt": method, "kd": args.kd, "device": args.device,
                    "precision": args.precision, "compile": args.compile, "batch_size": args.batch_size})


IMPLS = ("ours", "ours_cached", "reference")


def make_step(run: ContinualRun, impl: str, images: torch.Tensor, targets: torch.Tensor, classes: TaskClasses,
              reference: OfficialStyleStep | None = None):
    """A function doing one training step of `impl`: the product's step, the product's step with the batch's
    frozen outputs precomputed (from the second epoch on without augmentation), or the official-style one
    (`reference`, built from `run` when not given)."""
    if impl == "reference":
        reference = reference or OfficialStyleStep(run)
        optimizer = reference.optimizer()
        return lambda: reference.step(images, targets, TASK, classes, optimizer)
    optimizer, _ = run.trainer.optimizer(run.student)
    frozen = run.frozen_inputs("student", images, TASK) if impl == "ours_cached" else None
    return lambda: run.step("student", images, targets, TASK, classes, [optimizer], frozen)


def images_per_second(step, steps: int, batch: int, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return steps * batch / (time.perf_counter() - start)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def _peak_step_mib(args: argparse.Namespace, method: str, impl: str) -> float:
    """Runs in a fresh process: the memory two training steps of `impl` need beyond what was allocated before."""
    torch.set_num_threads(args.threads)
    run, images, targets, classes = build(args, method)
    step = make_step(run, impl, images, targets, classes)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(), step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    step(), step()
    return (_rss_kib("VmHWM") - before) / 1024


def peak_step_mib(args: argparse.Namespace, method: str, impl: str) -> float:
    # A fixed mmap threshold makes glibc hand freed buffers back at once, so RSS follows what is allocated.
    environment = os.environ.copy()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_peak_step_mib, (args, method, impl))
    finally:
        os.environ.clear()
        os.environ.update(environment)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, default=["demo-t", "demo-s"], metavar=("TEACHER", "STUDENT"), help="backbone presets")
    parser.add_argument("--paper", action="store_true", help="the paper's ViT-B -> ViT-S pair (random weights, 224 px)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (medians are printed)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the product's precision (the reference is fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the product's backbone passes")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a smoke-sweep trial's one CPU)")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    parser.add_argument("--table", choices=["reference", "methods", "both"], default="both",
                        help="reference: the student step against the official-style one; methods: every method pair's step")
    parser.add_argument("--kd", default="cdl_prompt", choices=KD_METHODS, help="the distillation method of the reference table")
    parser.add_argument("--prompts", nargs="+", default=list(ALL_PROMPTS), help="prompt methods of the methods table")
    parser.add_argument("--kd-methods", nargs="+", default=list(ALL_KD), help="distillation methods of the methods table")
    parser.add_argument("--against", metavar="REV", help="time each step of the methods table beside git revision REV's")
    args = parser.parse_args(argv)
    if args.paper:
        args.pair = ["vit_base_patch16_224", "vit_small_patch16_224"]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = reference_table(args) if args.table in ("reference", "both") else []
    if args.table in ("methods", "both"):
        rows += methods_table(args)
    return rows


def _where(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"


class StepWorker:
    """A bench/step_worker.py process timing one step of the code in `tree`."""

    def __init__(self, tree: Path, args: argparse.Namespace, prompt: str, kd: str) -> None:
        settings = dict(pair=args.pair, batch_size=args.batch_size, steps=args.steps, device=args.device,
                        precision=args.precision, compile=args.compile, threads=args.threads, prompt=prompt, kd=kd)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "step_worker.py"), str(tree), json.dumps(settings)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tree)
        reply = json.loads(self.proc.stdout.readline() or '{"error": "the worker exited"}')
        self.error = reply.get("error")
        if not self.error and Path(reply["cdl_core"]) != tree.resolve():
            raise RuntimeError(f"the worker for {tree} imported cdl_core from {reply['cdl_core']}")

    def time(self) -> float:
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["img_per_s"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        self.proc.wait()


@contextmanager
def checkout(revision: str):
    """`revision` of this repository checked out in a temporary worktree."""
    with tempfile.TemporaryDirectory(prefix="step-bench-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)


def methods_table(args: argparse.Namespace) -> list[dict]:
    """The student step of every (prompt method, distillation method) pair, in img/s; with --against, beside the
    same step of that revision (alternating runs, each implementation in its own process)."""
    against = f" beside {args.against}" if args.against else ""
    print(f"\nStudent step of every method pair{against}, {args.pair[0]} -> {args.pair[1]} (alone: {args.pair[1]}), "
          f"batch {args.batch_size}, {_where(args)}; median of {args.repeats} runs x {args.steps} steps")
    header = f"{'prompt':<11} {'distill':<11} {'img/s':>8}"
    if args.against:
        header += f" {args.against[:10]:>10} {'ratio':>6}"
    print(header, flush=True)
    rows = []
    with (checkout(args.against) if args.against else nullcontext()) as old_tree:
        for prompt in args.prompts:
            for kd in args.kd_methods:
                workers = {"ours": StepWorker(ROOT, args, prompt, kd)}
                if old_tree is not None:
                    workers["old"] = StepWorker(old_tree, args, prompt, kd)
                try:
                    if workers["ours"].error:
                        print(f"{prompt:<11} {kd:<11} {'-':>8}  ({workers['ours'].error[:90]})", flush=True)
                        continue
                    live = {name: w for name, w in workers.items() if not w.error}
                    rates: dict[str, list[float]] = {name: [] for name in live}
                    for _ in range(args.repeats):
                        for name, worker in live.items():
                            rates[name].append(worker.time())
                    row = {"prompt": prompt, "kd": kd, "ours": statistics.median(rates["ours"])}
                    line = f"{prompt:<11} {kd:<11} {row['ours']:>8.1f}"
                    if "old" in live:
                        row["old"] = statistics.median(rates["old"])
                        row["ratio"] = statistics.median(o / r for o, r in zip(rates["ours"], rates["old"]))
                        line += f" {row['old']:>10.1f} {row['ratio']:>5.2f}x"
                    elif old_tree is not None:
                        line += f" {'-':>10} {'new':>6}"
                    print(line, flush=True)
                    rows.append(row)
                finally:
                    for worker in workers.values():
                        worker.close()
    return rows


def reference_table(args: argparse.Namespace) -> list[dict]:
    where = _where(args)
    print(f"{args.kd} student step, {args.pair[0]} -> {args.pair[1]}, batch {args.batch_size}, {where}, torch {torch.__version__}, "
          f"ours: {args.precision}{' + compile' if args.compile else ''}; median of {args.repeats} runs x {args.steps} steps")
    header = f"{'method':<11} {'ours img/s':>10} {'reference':>10} {'ratio':>6} {'cached':>8} {'ratio':>6}"
    if args.memory:
        header += f" {'step MiB ours':>14} {'reference':>10}"
    print(header, flush=True)
    rows = []
    for method in args.methods:
        run, images, targets, classes = build(args, method)
        reference = OfficialStyleStep(run)
        if args.precision == "fp32":  # bf16 changes the last bits by design; the math was checked in fp32
            check_same_step(run, reference, images, targets, TASK, classes)
        steps = {impl: make_step(run, impl, images, targets, classes, reference) for impl in IMPLS}
        for step in steps.values():  # warm-up (and compilation)
            step()
        rates: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                rates[name].append(images_per_second(step, args.steps, args.batch_size, run.device))
        row = {"method": method, **{name: statistics.median(r) for name, r in rates.items()},
               "ratio": statistics.median(o / r for o, r in zip(rates["ours"], rates["reference"])),
               "ratio_cached": statistics.median(o / r for o, r in zip(rates["ours_cached"], rates["reference"]))}
        line = (f"{method:<11} {row['ours']:>10.1f} {row['reference']:>10.1f} {row['ratio']:>5.2f}x "
                f"{row['ours_cached']:>8.1f} {row['ratio_cached']:>5.2f}x")
        if args.memory:
            row["mib_ours"], row["mib_reference"] = (peak_step_mib(args, method, impl) for impl in ("ours", "reference"))
            line += f" {row['mib_ours']:>14.1f} {row['mib_reference']:>10.1f}"
        print(line, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
