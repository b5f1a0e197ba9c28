"""Training-step throughput (img/s) per prompt method and backbone preset: median of several timed runs.

A step is what the learner does per batch: the frozen query pass, the prompted forward, the loss, backward
and the Adam update of prompts and head. Random weights (speed does not depend on them).

    python bench/step_throughput.py                      # demo presets, all methods
    python bench/step_throughput.py --presets vit_base_patch16_224 --batch-size 16 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdl_core.backbones import create_backbone
from cdl_core.config import BackboneConfig
from cdl_core.distill import TaskClasses
from cdl_core.distill.losses import current_task_cross_entropy
from cdl_core.model import ContinualModel
from cdl_core.prompts import PROMPT_METHODS, build_prompt_method


def time_steps(model: ContinualModel, images: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    classes = TaskClasses(past=0, seen=int(targets.max()) + 1)
    model.prompt.begin_task(0)
    model.train()

    def step() -> None:
        query = model.backbone.query(images)
        out = model(images, query, 0, train=True)
        loss = current_task_cross_entropy(out.logits, targets, classes) + out.prompt_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["demo-s", "demo-t"])
    parser.add_argument("--methods", nargs="+", default=["none", "l2p", "dualprompt", "coda"], choices=sorted(PROMPT_METHODS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"median of {args.repeats} runs x {args.steps} steps")
    print(f"{'preset':<24} {'method':<11} {'img/s':>8} {'min':>8} {'max':>8}")
    for preset in args.presets:
        backbone = create_backbone(BackboneConfig(preset=preset, weights="random"))
        images = torch.randn(args.batch_size, 3, backbone.image_size, backbone.image_size)
        targets = torch.randint(0, 10, (args.batch_size,))
        for method in args.methods:
            prompt = build_prompt_method(method, {}, backbone.embed_dim, backbone.embed_dim, 10, backbone.depth)
            model = ContinualModel(backbone, prompt, n_classes=100)
            rates = [time_steps(model, images, targets, args.steps) for _ in range(args.repeats)]
            print(f"{preset:<24} {method:<11} {statistics.median(rates):>8.1f} {min(rates):>8.1f} {max(rates):>8.1f}", flush=True)


if __name__ == "__main__":
    main()
