"""Typed, self-validating run configuration.

One `RunConfig` describes one run completely. It serialises to a plain dict (`to_dict`) and back
(`RunConfig.from_dict`), which is what the orchestrator passes around and what `cdl_core.run --config`
reads. Every choice that changes results (class order, test-time prompt selection, weights source, ...)
is an explicit field here so that it is logged with the run. The choices in which the official CDL code and a
plain timm setup differ default to None and take the run's `protocol` value when validated
(`cdl_core.catalog.protocols`); a value set explicitly wins.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from cdl_core.catalog.datasets import get_dataset
from cdl_core.catalog.distill import KD_PARAMS, resolve_kd_params
from cdl_core.catalog.presets import DEMO_RECIPES, FASHION_RESERVED_PER_CLASS, PRESETS, get_preset, uses_demo_pretraining
from cdl_core.catalog.prompts import PROMPT_PARAMS, resolve_prompt_params
from cdl_core.catalog.protocols import PROTOCOLS, fill_from_protocol, protocol_fields
from cdl_core.errors import ConfigError

__all__ = ["BackboneConfig", "ConfigError", "DataConfig", "DistillConfig", "PromptConfig", "RunConfig", "TrainConfig"]


def _one_of(name: str, value: Any, valid: tuple | list) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


@dataclass
class DataConfig:
    """Which class-incremental stream to build and how."""

    name: str = "fashion_mnist"
    root: str | None = None  # None: the dataset's default locations (see cdl_core.data)
    n_tasks: int | None = None  # None: the dataset's protocol default (cifar100/imagenet_r 10, fashion_mnist 5)
    class_order: Literal["sorted", "shuffled"] = "sorted"
    class_order_seed: int = 0
    train_per_class: int | None = None  # None: dataset default (fashion_mnist 600, others all)
    test_per_class: int | None = None  # None: dataset default (fashion_mnist 200, others all)
    # Carved from each task's training data; tuning reads this, never test. Protocol: official 0 (no validation
    # split, every training image trains), timm 0.1.
    val_fraction: float | None = None
    split_seed: int = 0
    # Protocol: official "unit" (ToTensor only, [0, 1]); timm "mean_std" (the backbone weights' own mean/std).
    input_scaling: Literal["unit", "mean_std"] | None = None
    # imagenet_r only: a folder holding the official split lists imagenet-r_train.yaml and imagenet-r_test.yaml
    # (CODA-Prompt / CDL repositories) with their class ids; None: our own deterministic per-class split.
    split_files: str | None = None
    train_augment: bool = True  # RandomResizedCrop + horizontal flip
    crop_scale_min: float = 0.08
    download: bool = False  # let torchvision download cifar100/fashion_mnist when online

    def validate(self) -> None:
        fill_from_protocol(self, "data", "official")  # alone (not in a RunConfig): the default protocol
        get_dataset(self.name)
        _one_of("data.class_order", self.class_order, ("sorted", "shuffled"))
        _one_of("data.input_scaling", self.input_scaling, ("unit", "mean_std"))
        if self.split_files is not None and self.name != "imagenet_r":
            raise ConfigError(f"data.split_files is for imagenet_r's official split lists, not {self.name!r}; remove it")
        if self.n_tasks is not None and self.n_tasks < 1:
            raise ConfigError(f"data.n_tasks={self.n_tasks} must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        for name in ("train_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be a positive number of images (or null for all)")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"data.crop_scale_min={self.crop_scale_min} must be in (0, 1]")


@dataclass
class BackboneConfig:
    """A frozen ViT: a preset name from `cdl_core.catalog.presets.PRESETS` and where its weights come from."""

    preset: str = "demo-s"
    # "default": the preset's own source (timm hub for paper presets, cached offline pretraining for demo
    # presets); "random": no pretrained weights; anything else: path to a local state-dict file.
    weights: str = "default"
    # Hub presets with weights="default": the timm pretrained tag to load (the tag behind a bare timm name changed
    # between timm versions, e.g. ViT-B augreg -> augreg2). None: the preset's own tag, recorded once validated.
    pretrained_tag: str | None = None

    def validate(self, role: str) -> None:
        _one_of(f"{role}.preset", self.preset, sorted(PRESETS))
        preset = get_preset(self.preset)
        if preset.weights_source == "hub" and self.weights == "default":
            self.pretrained_tag = self.pretrained_tag or preset.pretrained_tag
        elif self.pretrained_tag is not None:
            raise ConfigError(f"{role}.pretrained_tag={self.pretrained_tag!r} applies only to a hub preset's default weights "
                              f"({self.preset} with weights={self.weights!r} loads no hub tag); remove it")
        if self.weights not in ("default", "random") and not Path(self.weights).expanduser().is_file():
            raise ConfigError(
                f"{role}.weights={self.weights!r}: no such file; give a state-dict file, 'default' or 'random'"
            )


@dataclass
class PromptConfig:
    """Prompt method and its parameters; `params` overrides the method's official defaults."""

    method: str = "coda"
    params: dict[str, Any] = field(default_factory=dict)
    # The teacher's parameters where they differ from the student's: e.g. a space that tunes the student's APT ema
    # keeps the teacher's fixed here, so one stored teacher serves every trial.
    teacher_params: dict[str, Any] = field(default_factory=dict)

    def params_for(self, role: str) -> dict[str, Any]:
        """The parameter overrides of `role` ("student" or "teacher")."""
        return self.params | self.teacher_params if role == "teacher" else self.params

    def validate(self) -> None:
        _one_of("prompt.method", self.method, sorted(PROMPT_PARAMS))
        resolve_prompt_params(self.method, self.params)
        if self.teacher_params:
            resolve_prompt_params(self.method, self.params_for("teacher"))


@dataclass
class DistillConfig:
    """How the student learns from the teacher. `method="none"` trains the student alone."""

    method: str = "none"
    # "sequential": per task the teacher trains first, then the student (the official code, v1 included); "joint":
    # an alternative of ours where every student batch steps the teacher first.
    schedule: Literal["sequential", "joint"] = "sequential"
    alpha: float = 0.5  # weight of the distillation term; CE gets (1 - alpha)
    temperature: float | None = None  # None: the method's own default (kd and cdl_prompt 2, dkd 4 as the official code)
    params: dict[str, Any] = field(default_factory=dict)  # method-specific, e.g. dkd's weights
    # A KD head's share of the student's prediction. Protocol: "weighted" (1 - alpha) z_last + alpha z_kd
    # (official code); "mean" (z_last + z_kd) / 2 whatever alpha is.
    prediction: Literal["weighted", "mean"] | None = None
    # Which merged copy of a frozen teacher's prompts (APT keeps one for evaluation) its signal to the student uses.
    # Protocol: official "previous" (merged over the earlier tasks, zeros on the first: the official code merges after
    # the student's phase); timm "current" (merged after this task, the teacher as it is evaluated).
    teacher_merged_prompts: Literal["previous", "current"] | None = None

    def validate(self) -> None:
        fill_from_protocol(self, "distill", "official")
        _one_of("distill.method", self.method, sorted(KD_PARAMS))
        if self.temperature is None:
            self.temperature = KD_PARAMS[self.method].default_temperature
        resolve_kd_params(self.method, self.params)
        _one_of("distill.schedule", self.schedule, ("sequential", "joint"))
        _one_of("distill.prediction", self.prediction, ("weighted", "mean"))
        _one_of("distill.teacher_merged_prompts", self.teacher_merged_prompts, ("previous", "current"))
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be positive")


@dataclass
class TrainConfig:
    """Optimisation, identical for every task (a fresh optimizer is made per task)."""

    epochs: int = 1
    batch_size: int = 64
    eval_batch_size: int = 256
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    # Per epoch e of K. Protocol: official "official_cosine" lr * cos(99 pi max(e-1, 0) / (200 (K-1))) (the
    # official code's schedule); timm "cosine" (torch's CosineAnnealingLR). "constant": lr throughout.
    lr_schedule: Literal["official_cosine", "cosine", "constant"] | None = None
    drop_last: bool | None = None  # drop each epoch's last partial training batch. Protocol: official yes, timm no
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    # Opt-in speed-ups meant for GPUs (off by default: not yet measured faster on one, see README "Performance");
    # both also run, correctly but slower, on CPU. Results change in the last bits, so both are part of a run's
    # identity (a stored teacher trained in bf16 is not reused by an fp32 run).
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the forward passes to bfloat16
    compile: bool = False  # torch.compile the backbone passes
    # A stored teacher's students read their frozen signals (queries, teacher logits) from the teacher store, where
    # the first of them stores them (cdl_core.signal_cache), while one teacher's would take at most this; 0: off.
    signal_cache_max_gb: float = 8.0

    def validate(self) -> None:
        fill_from_protocol(self, "train", "official")
        if self.epochs < 1:
            raise ConfigError(f"train.epochs={self.epochs} must be at least 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("train.batch_size and train.eval_batch_size must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay={self.weight_decay} must be >= 0")
        _one_of("train.lr_schedule", self.lr_schedule, ("official_cosine", "cosine", "constant"))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers={self.num_workers} must be >= 0")
        _one_of("train.precision", self.precision, ("fp32", "bf16"))
        if self.signal_cache_max_gb < 0:
            raise ConfigError(f"train.signal_cache_max_gb={self.signal_cache_max_gb} must be >= 0 (0 turns the signal cache off)")


@dataclass
class RunConfig:
    """One run: a student (and optionally a teacher) learning one task stream with one prompt method.

    Without a teacher, the student is simply the continual learner (this is also how a teacher is trained).
    """

    # Where the fields left unset (None) take their values: "official" (the official CDL code) or "timm"
    # (cdl_core.catalog.protocols lists both and how they differ).
    protocol: str = "official"
    data: DataConfig = field(default_factory=DataConfig)
    student: BackboneConfig = field(default_factory=BackboneConfig)
    teacher: BackboneConfig | None = None
    # Backbone whose prompt-free [CLS] output is the prompt-selection query. "student": the student-size
    # backbone serves both models (official CDL code; one query pass per batch). "own": each model queries
    # with its own backbone (plain L2P/DualPrompt/CODA).
    query: Literal["student", "own"] = "student"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Which forgetting the summary's `forgetting` shows; both are always computed, as `forgetting_cdl` (mean over
    # all T tasks of R[j][j] - R[T][j], as the official trainer prints it) and `forgetting_chaudhry` (mean over
    # j < T of max_l R[l][j] - R[T][j]). Protocol: official "cdl", timm "chaudhry".
    forgetting: Literal["cdl", "chaudhry"] | None = None

    def validate(self) -> "RunConfig":
        _one_of("protocol", self.protocol, list(PROTOCOLS))
        fill_from_protocol(self, "", self.protocol)
        for name in ("data", "train", "distill"):
            fill_from_protocol(getattr(self, name), name, self.protocol)
        _one_of("forgetting", self.forgetting, ("cdl", "chaudhry"))
        self.data.validate()
        self.student.validate("student")
        if self.teacher is not None:
            self.teacher.validate("teacher")
        _one_of("query", self.query, ("student", "own"))
        self.prompt.validate()
        self.distill.validate()
        self.train.validate()
        if self.distill.method != "none" and self.teacher is None:
            raise ConfigError(
                f"distill.method={self.distill.method!r} needs a teacher; set teacher.preset (e.g. --teacher demo-t) "
                "or use distill.method='none'"
            )
        self._check_structure()
        return self

    def _check_structure(self) -> None:
        """What the config decides together with the presets' and datasets' metadata, without building a model
        or reading an image: found here, a bad setting stops a sweep before launch instead of failing every trial."""
        n_tasks = get_dataset(self.data.name).n_tasks(self.data.n_tasks)
        prompt = resolve_prompt_params(self.prompt.method, self.prompt.params)
        backbones = {"student": self.student} | ({"teacher": self.teacher} if self.teacher else {})
        for role, backbone in backbones.items():
            preset = get_preset(backbone.preset)
            resolve_prompt_params(self.prompt.method, self.prompt.params_for(role)).check_against(n_tasks, preset.depth, f"the {role} {preset.name}")
        if self.teacher is not None:
            kd = resolve_kd_params(self.distill.method, self.distill.params)
            kd.check_against(prompt, n_tasks)
            student, teacher = get_preset(self.student.preset), get_preset(self.teacher.preset)
            kd.check_backbones(student, teacher)
            for attr in ("image_size", "mean", "std"):
                if getattr(teacher, attr) != getattr(student, attr):
                    raise ConfigError(
                        f"teacher {teacher.name} and student {student.name} differ in input {attr} "
                        f"({getattr(teacher, attr)} vs {getattr(student, attr)}); pick presets with the same input"
                    )
        self._check_stream_disjoint(backbones)

    def _check_stream_disjoint(self, backbones: dict[str, BackboneConfig]) -> None:
        """Refuse a fashion_mnist stream that would reuse images the default demo weights were pretrained on."""
        if self.data.name != "fashion_mnist":
            return
        per_class = self.data.train_per_class or get_dataset("fashion_mnist").default_train_per_class
        for role, backbone in backbones.items():
            if not uses_demo_pretraining(backbone.preset, backbone.weights):
                continue
            if DEMO_RECIPES[backbone.preset].source == "fashion_mnist_heldout" and per_class > FASHION_RESERVED_PER_CLASS:
                raise ConfigError(
                    f"data.train_per_class={per_class} would overlap the Fashion-MNIST images the {role}'s demo weights "
                    f"were pretrained on; use at most {FASHION_RESERVED_PER_CLASS} or {role}.weights=random/a file"
                )

    def protocol_record(self) -> dict[str, Any]:
        """The protocol's name and the value of each field it sets, as this (validated) run uses them, with the
        KD temperature actually applied: what a reader of the run needs to compare it with another."""
        record: dict[str, Any] = {"protocol": self.protocol}
        for owner, name, _ in protocol_fields(self.protocol):
            record[f"{owner}.{name}" if owner else name] = getattr(getattr(self, owner) if owner else self, name)
        record["distill.temperature"] = self.distill.temperature
        return record

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        return _build(cls, raw, "config").validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "RunConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
        return cls.from_dict(raw)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving the string annotations is most of a config's construction time; a sweep builds thousands.
    return get_type_hints(cls)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = _type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where != "config" else name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(float(v) if args and args[0] is float else v for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
