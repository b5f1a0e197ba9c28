"""Backbone presets: what each named ViT is and where its weights come from, as plain metadata (no torch).

Validation and sweep planning read a preset's shape (depth, width, input size and scaling) and its weights
source from here without building a model; `cdl_core.backbones.create_backbone` builds it through timm.
Paper presets name their pretrained tag explicitly: the tag behind a bare timm name changed between timm
versions (ViT-B: augreg -> augreg2), and the tag is part of a run's record.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cdl_core.errors import ConfigError

IMAGENET_INCEPTION = (0.5, 0.5, 0.5)  # mean and std of timm's augreg ViT tags (and of its ViT default config)


@dataclass(frozen=True)
class BackbonePreset:
    name: str
    timm_name: str  # the architecture in timm's registry
    weights_source: Literal["hub", "demo_pretrain"]
    embed_dim: int
    depth: int
    num_heads: int
    image_size: int
    patch_size: int = 16
    mean: tuple[float, float, float] = IMAGENET_INCEPTION
    std: tuple[float, float, float] = IMAGENET_INCEPTION
    pretrained_tag: str | None = None  # hub presets: the timm pretrained tag loaded by weights='default'
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model beyond its defaults

    @property
    def tokens(self) -> int:
        """Sequence length of a prompt-free pass: the patches and [CLS]."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def hub_model(self, tag: str | None = None) -> str:
        """timm's `architecture.tag` name of the hub weights with `tag` (None: the preset's own)."""
        return f"{self.timm_name}.{tag or self.pretrained_tag}"

    def hf_hub_id(self, tag: str | None = None) -> str:
        return f"timm/{self.hub_model(tag)}"


PRESETS: dict[str, BackbonePreset] = {}


def register_preset(preset: BackbonePreset) -> BackbonePreset:
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> BackbonePreset:
    if name not in PRESETS:
        raise ConfigError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# The paper's backbones (ImageNet-21k pretrained, fine-tuned on 1k), with the tags timm 1.0 loads for them.
# Which tag made the published numbers is not recorded by the authors (DESIGN.md section 2).
for _size, _dim, _depth, _heads, _tag in (
    ("large", 1024, 24, 16, "augreg_in21k_ft_in1k"),
    ("base", 768, 12, 12, "augreg2_in21k_ft_in1k"),
    ("small", 384, 12, 6, "augreg_in21k_ft_in1k"),
    ("tiny", 192, 12, 3, "augreg_in21k_ft_in1k"),
):
    register_preset(BackbonePreset(f"vit_{_size}_patch16_224", f"vit_{_size}_patch16_224", "hub", _dim, _depth, _heads, 224,
                                   pretrained_tag=_tag))

# CPU demo sizes: 32 px, patch 4, head width 32. Like ViT-B -> ViT-S, teacher and student share the depth
# (6, so every official prompt layer 0-4 exists) and differ in width.
# They are pretrained here on inputs in [0, 1] (the official protocol's scaling): their own mean/std are 0/1, so
# both input scalings feed them what they were pretrained on.
_DEMO = dict(img_size=32, patch_size=4, depth=6)
_UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
register_preset(BackbonePreset("demo-t", "vit_tiny_patch16_224", "demo_pretrain", 128, 6, 4, 32, 4, **_UNIT,
                               model_kwargs=dict(_DEMO, embed_dim=128, num_heads=4)))
register_preset(BackbonePreset("demo-s", "vit_tiny_patch16_224", "demo_pretrain", 64, 6, 2, 32, 4, **_UNIT,
                               model_kwargs=dict(_DEMO, embed_dim=64, num_heads=2)))


# -- the demo presets' offline pretraining: recipe and cache location (the training is cdl_core.pretrain) -------
PRETRAIN_VERSION = 1
# Pretraining never sees the first this-many Fashion-MNIST training images of each class, so a fashion_mnist
# stream with train_per_class up to this limit is disjoint from it (checked in cdl_core.validation).
FASHION_RESERVED_PER_CLASS = 1000


@dataclass(frozen=True)
class PretrainRecipe:
    # Measured here (2 cores): demo-s ~600 img/s, demo-t ~275 img/s per train step; 3 epochs on 19k images give
    # ~80% held-out accuracy. Crop augmentation slowed convergence at this budget, so only flips are used.
    source: str = "fashion_mnist_heldout"  # "fashion_mnist_heldout" | "mnist_digits"
    images: int = 20000
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    holdout_fraction: float = 0.05  # accuracy printed when the weights are made
    seed: int = 0


DEMO_RECIPES: dict[str, PretrainRecipe] = {
    "demo-t": PretrainRecipe(),
    "demo-s": PretrainRecipe(),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CDL_CACHE_DIR", Path.home() / ".cache" / "cdl")).expanduser() / "backbones"


def _recipe_key(preset_name: str, recipe: PretrainRecipe) -> str:
    preset = PRESETS[preset_name]
    payload = dict(preset=preset_name, timm_name=preset.timm_name, model_kwargs=preset.model_kwargs,
                   mean=preset.mean, std=preset.std, recipe=asdict(recipe), version=PRETRAIN_VERSION)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def demo_weights_path(preset_name: str, recipe: PretrainRecipe | None = None) -> Path:
    """Where the pretrained weights of a demo preset are cached (named by a hash of everything that makes them)."""
    recipe = recipe or DEMO_RECIPES[preset_name]
    return cache_dir() / f"{preset_name}-{_recipe_key(preset_name, recipe)}.pt"


def uses_demo_pretraining(preset_name: str, weights: str) -> bool:
    return weights == "default" and PRESETS[preset_name].weights_source == "demo_pretrain"


def weights_source_id(preset_name: str, weights: str, tag: str | None = None) -> str:
    """Names the weights a backbone config loads without loading them, for content-addressed keys: the demo
    recipe's hash, the hub model id and pretrained tag (`tag`, None: the preset's), the sha256 of a weights file,
    or random (seeded by the preset)."""
    preset = get_preset(preset_name)
    if weights == "random":
        return f"random:{preset.name}"
    if uses_demo_pretraining(preset_name, weights):
        return f"demo_pretrain:{demo_weights_path(preset.name).stem}"
    if weights == "default":
        return f"hub:{preset.hf_hub_id(tag)}@{tag or preset.pretrained_tag}"
    path = Path(weights).expanduser().resolve()
    stat = path.stat()
    return f"file-sha256:{_file_sha256(path, stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=64)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Cached by size and modification time: planning a sweep hashes each weights file once, not per cell."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
