"""Teacher alone vs student alone vs student + KD methods, over several seeds: mean and std of final average
accuracy and forgetting (test split, %).

Each seed trains the teacher once (sequential schedule, into a temporary teacher store) and reuses it for
every KD method, so all students of a seed learn from the same teacher.

    python bench/kd_comparison.py --method coda --seeds 0 1 2 --epochs 1
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from collections import defaultdict

from cdl_core.config import BackboneConfig, DataConfig, DistillConfig, PromptConfig, RunConfig, TrainConfig
from cdl_core.learner import ContinualRun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="coda", help="prompt method (l2p, dualprompt, coda, apt)")
    parser.add_argument("--teacher", default="demo-t")
    parser.add_argument("--student", default="demo-s")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--kd", nargs="+", default=["kd", "dkd", "fitnets", "reviewkd", "deit", "dcdl", "cdl_prompt"],
                        help="distillation methods to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="16: ~68 optimizer steps per Fashion-MNIST task")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    scores: dict[str, list[tuple[float, float, float]]] = defaultdict(list)

    def measures(summary: dict, role: str) -> tuple[float, float, float]:
        return tuple(summary[f"{role}_test_{name}"] for name in ("final_avg_acc", "forgetting_cdl", "forgetting_chaudhry"))

    for seed in args.seeds:
        base = RunConfig(
            data=DataConfig(name=args.dataset), student=BackboneConfig(args.student),
            prompt=PromptConfig(args.method), train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=seed),
        )
        alone = ContinualRun(base).run()["summary"]
        scores[f"student alone ({args.student})"].append(measures(alone, "student"))
        with tempfile.TemporaryDirectory() as teacher_store:
            for kd in args.kd:
                cfg = RunConfig.from_dict(base.to_dict() | {"teacher": {"preset": args.teacher}, "distill": DistillConfig(kd).__dict__})
                summary = ContinualRun(cfg, teacher_store=teacher_store).run()["summary"]
                if kd == args.kd[0]:
                    scores[f"teacher ({args.teacher})"].append(measures(summary, "teacher"))
                scores[f"student + {kd}"].append(measures(summary, "student"))
        print(f"seed {seed} done: " + ", ".join(f"{k} {v[-1][0]:.1f}" for k, v in scores.items()), flush=True)

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):6.2f} ± {std:5.2f}"

    print(f"\n{args.method} on {args.dataset}, {args.epochs} epoch(s)/task, seeds {args.seeds}")
    print(f"| {'model':<28} | {'final avg acc':>15} | {'forgetting (CDL)':>16} | {'forgetting (Chaudhry)':>21} |")
    print(f"|{'-' * 30}|{'-' * 17}|{'-' * 18}|{'-' * 23}|")
    for name, rows in scores.items():
        acc, cdl, chaudhry = (mean_std([row[i] for row in rows]) for i in range(3))
        print(f"| {name:<28} | {acc:>15} | {cdl:>16} | {chaudhry:>21} |")


if __name__ == "__main__":
    main()
