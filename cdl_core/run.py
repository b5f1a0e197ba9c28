"""One run, no Ray, no MLflow: `python -m cdl_core.run --method coda --backbone demo-s --dataset fashion_mnist`.

With `--teacher`, trains the teacher and the student task by task (teacher first in the sequential schedule),
then the student alone as the baseline, and prints teacher / student alone / student with KD side by side.
Results go to a JSON file (`--out`).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

from cdl_core.cli import run_cli
from cdl_core.catalog.protocols import PROTOCOLS, protocol_fields
from cdl_core.config import BackboneConfig, RunConfig
from cdl_core.errors import ConfigError

log = logging.getLogger("cdl_core.run")


def _key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cdl_core.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON config file (a RunConfig dict, e.g. a best-config export); flags below override it")
    p.add_argument("--protocol", choices=list(PROTOCOLS), help="official (default: the official CDL code's input scaling, lr "
                   "schedule, dropped batches, no validation split, prediction and forgetting) or timm; sets those fields "
                   "(over a --config file's), and the flags below override single ones")
    p.add_argument("--input-scaling", choices=["unit", "mean_std"], help="unit: images in [0, 1] (official); mean_std: the weights' mean/std")
    p.add_argument("--lr-schedule", choices=["official_cosine", "cosine", "constant"], help="per-epoch lr schedule (official: official_cosine)")
    p.add_argument("--drop-last", action=argparse.BooleanOptionalAction, default=None, help="drop each epoch's last partial batch (official: yes)")
    p.add_argument("--val-fraction", type=float, help="validation split carved from each task's training data (official: 0)")
    p.add_argument("--prediction", choices=["weighted", "mean"], help="a KD head's share of the prediction: weighted (official) or mean")
    p.add_argument("--forgetting", choices=["cdl", "chaudhry"], help="which forgetting the summary shows (both are computed; official: cdl)")
    p.add_argument("--split-files", help="imagenet_r: folder with the official imagenet-r_train.yaml / imagenet-r_test.yaml")
    p.add_argument("--student-tag", help="timm pretrained tag of a hub student (default: the preset's, e.g. augreg2_in21k_ft_in1k)")
    p.add_argument("--teacher-tag", help="timm pretrained tag of a hub teacher (default: the preset's)")
    p.add_argument("--method", help="prompt method: l2p, dualprompt, coda, apt, none (default coda)")
    p.add_argument("--backbone", "--student", dest="student", help="student backbone preset (default demo-s)")
    p.add_argument("--teacher", help="teacher backbone preset (e.g. demo-t); omit for a single learner")
    p.add_argument("--kd", help="distillation method: none, kd, dkd, fitnets, reviewkd, deit, dcdl, cdl_prompt (default cdl_prompt with --teacher)")
    p.add_argument("--dataset", help="fashion_mnist (default, offline), cifar100, imagenet_r, synthetic")
    p.add_argument("--data-root", help="where the dataset lives (default: the dataset's usual locations)")
    p.add_argument("--download", action="store_true", default=None, help="let torchvision download cifar100 / fashion_mnist when online")
    p.add_argument("--n-tasks", type=int)
    p.add_argument("--train-per-class", type=int)
    p.add_argument("--test-per-class", type=int)
    p.add_argument("--class-order", choices=["sorted", "shuffled"])
    p.add_argument("--epochs", type=int, help="epochs per task (default 1)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast forward passes to bfloat16 (opt-in, for GPUs; default fp32)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the backbone passes (opt-in, for GPUs)")
    p.add_argument("--schedule", choices=["sequential", "joint"], help="teacher/student schedule (default sequential)")
    p.add_argument("--query", choices=["student", "own"], help="query backbone (default student, as the official CDL code)")
    p.add_argument("--alpha", type=float, help="KD weight a (default 0.5)")
    p.add_argument("--temperature", type=float, help="KD temperature T (default: the method's own: dkd 4, the others 2)")
    p.add_argument("--teacher-merged-prompts", choices=["previous", "current"],
                   help="which merged prompts a frozen APT teacher signals with: previous (official) or current")
    p.add_argument("--prompt-param", action="append", default=[], metavar="KEY=VALUE", help="override a prompt-method parameter, e.g. pool_size=50")
    p.add_argument("--teacher-prompt-param", action="append", default=[], metavar="KEY=VALUE",
                   help="the teacher's prompt-method parameter where it differs from the student's, e.g. ema=0.7")
    p.add_argument("--kd-param", action="append", default=[], metavar="KEY=VALUE", help="override a KD-method parameter, e.g. active_components=10")
    p.add_argument("--student-weights", help="student weights: default, random, or a state-dict file")
    p.add_argument("--teacher-weights", help="teacher weights: default, random, or a state-dict file")
    p.add_argument("--teacher-store", help="teacher store (a directory or a URI such as s3://bucket/teachers): the teacher is "
                   "loaded from there task by task when stored, and the tasks trained here are stored for later runs")
    p.add_argument("--require-teacher", action="store_true", help="only load the teacher from --teacher-store; never train it")
    p.add_argument("--no-baseline", action="store_true", help="with --teacher: skip the student-alone baseline run")
    p.add_argument("--out", default="outputs/run.json", help="results JSON (default outputs/run.json)")
    p.add_argument("--quiet", action="store_true", help="warnings only in the log")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    raw: dict[str, Any] = RunConfig().to_dict()
    if args.config:
        raw = RunConfig.from_json(args.config).to_dict()
    if args.protocol:  # the protocol's values replace the file's for the fields it sets; single flags come after
        raw["protocol"] = args.protocol
        for owner, name, _ in protocol_fields(args.protocol):
            (raw[owner] if owner else raw)[name] = None
    data, train, distill, prompt = raw["data"], raw["train"], raw["distill"], raw["prompt"]
    for flag, section, key in [
        ("dataset", data, "name"), ("data_root", data, "root"), ("download", data, "download"), ("n_tasks", data, "n_tasks"),
        ("train_per_class", data, "train_per_class"), ("test_per_class", data, "test_per_class"),
        ("class_order", data, "class_order"), ("epochs", train, "epochs"), ("batch_size", train, "batch_size"),
        ("lr", train, "lr"), ("seed", train, "seed"), ("device", train, "device"), ("precision", train, "precision"),
        ("compile", train, "compile"), ("schedule", distill, "schedule"),
        ("alpha", distill, "alpha"), ("temperature", distill, "temperature"), ("query", raw, "query"),
        ("input_scaling", data, "input_scaling"), ("val_fraction", data, "val_fraction"), ("split_files", data, "split_files"),
        ("lr_schedule", train, "lr_schedule"), ("drop_last", train, "drop_last"), ("prediction", distill, "prediction"),
        ("forgetting", raw, "forgetting"), ("teacher_merged_prompts", distill, "teacher_merged_prompts"),
    ]:
        value = getattr(args, flag)
        if value is not None:
            section[key] = value
    if args.student:
        raw["student"]["preset"] = args.student
    if args.student_weights:
        raw["student"]["weights"], raw["student"]["pretrained_tag"] = args.student_weights, None
    if args.student_tag:
        raw["student"]["pretrained_tag"] = args.student_tag
    if args.teacher:
        raw["teacher"] = dict(BackboneConfig(preset=args.teacher).__dict__)
        if not args.kd and not args.config:
            distill["method"] = "cdl_prompt"
    if args.teacher_weights:
        if raw["teacher"] is None:
            raise ConfigError("--teacher-weights needs --teacher")
        raw["teacher"]["weights"], raw["teacher"]["pretrained_tag"] = args.teacher_weights, None
    if args.teacher_tag:
        if raw["teacher"] is None:
            raise ConfigError("--teacher-tag needs --teacher")
        raw["teacher"]["pretrained_tag"] = args.teacher_tag
    if args.kd:
        distill["method"] = args.kd
    if args.method and args.method != prompt["method"]:
        prompt["method"], prompt["params"] = args.method, {}  # another method's params would not fit
    prompt["params"].update(_key_values(args.prompt_param, "--prompt-param"))
    prompt["teacher_params"].update(_key_values(args.teacher_prompt_param, "--teacher-prompt-param"))
    distill["params"].update(_key_values(args.kd_param, "--kd-param"))
    return RunConfig.from_dict(raw)


def _fmt_row(values: list[float]) -> str:
    return " ".join(f"{v:6.1f}" for v in values)


def print_task(report, n_tasks: int) -> None:
    parts = [f"task {report.task_id + 1}/{n_tasks}"]
    for role in ("teacher", "student"):
        if role in report.rows:
            row = report.rows[role]["test"]
            parts.append(f"{role} test acc [{_fmt_row(row)}] avg {sum(row) / len(row):5.1f}")
    print("  ".join(parts), flush=True)


def print_table(rows: list[tuple[str, dict[str, float], list[float]]], forgetting: str) -> None:
    print(f"\n{'model':<34} {'final avg acc':>13} {'avg inc acc':>11} {'forgetting':>10}   per-task acc after last task"
          f"   (forgetting: {forgetting})")
    for name, summary, last_row in rows:
        print(
            f"{name:<34} {summary['test_final_avg_acc']:>13.2f} {summary['test_avg_incremental_acc']:>11.2f} "
            f"{summary['test_forgetting']:>10.2f}   [{_fmt_row(last_row)}]"
        )


def _role_summary(results: dict[str, Any], role: str) -> tuple[dict[str, float], list[float]]:
    summary = {k[len(role) + 1 :]: v for k, v in results["summary"].items() if k.startswith(role + "_")}
    return summary, results["matrices"][role]["test"][-1]


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    from cdl_core.learner import ContinualRun  # after the config is checked: --help and bad flags need no torch

    runs: dict[str, Any] = {}
    print(f"run: {cfg.prompt.method} on {cfg.data.name}, student {cfg.student.preset}"
          + (f", teacher {cfg.teacher.preset}, kd {cfg.distill.method} ({cfg.distill.schedule})" if cfg.teacher else ""), flush=True)
    run = ContinualRun(cfg, teacher_store=args.teacher_store, require_teacher=args.require_teacher)
    main_name = "distilled" if cfg.teacher else "single"
    runs[main_name] = run.run(on_task=lambda r: print_task(r, run.n_tasks))
    if run.teacher_entry is not None:
        print(f"teacher stored as {run.teacher_entry}", flush=True)
    table = []
    if cfg.teacher:
        table.append((f"teacher ({cfg.teacher.preset}, {cfg.prompt.method})", *_role_summary(runs[main_name], "teacher")))
        if not args.no_baseline and cfg.distill.method != "none":
            alone = copy.deepcopy(cfg)
            alone.teacher, alone.distill = None, type(cfg.distill)()
            print(f"\nbaseline: student {cfg.student.preset} alone", flush=True)
            baseline = ContinualRun(alone.validate(), stream=run.stream)
            runs["student_alone"] = baseline.run(on_task=lambda r: print_task(r, baseline.n_tasks))
            table.append((f"student alone ({cfg.student.preset})", *_role_summary(runs["student_alone"], "student")))
        label = f"student + {cfg.distill.method}" if cfg.distill.method != "none" else "student (no KD)"
        table.append((f"{label} ({cfg.student.preset})", *_role_summary(runs[main_name], "student")))
    else:
        table.append((f"{cfg.student.preset} {cfg.prompt.method}", *_role_summary(runs[main_name], "student")))
    print_table(table, cfg.forgetting)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs}, indent=1))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
