"""Offline pretraining of the demo backbones.

Prompt methods assume a pretrained, frozen backbone, and no ViT weights can be downloaded here. The demo
presets are therefore pretrained once on real images that the continual stream never uses, and cached on disk
under a hash of everything that determines the weights; every later run reuses the file.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cdl_core.config import DataConfig
from cdl_core.catalog.presets import DEMO_RECIPES, FASHION_RESERVED_PER_CLASS, PRESETS, PretrainRecipe, demo_weights_path

log = logging.getLogger(__name__)


def _source_images(recipe: PretrainRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    from cdl_core.data import fashion_mnist_heldout, load_mnist_digits

    if recipe.source == "mnist_digits":
        images, labels = load_mnist_digits()
    elif recipe.source == "fashion_mnist_heldout":
        reserved = DataConfig(name="fashion_mnist", train_per_class=FASHION_RESERVED_PER_CLASS, val_fraction=0.0)
        images, labels = fashion_mnist_heldout(reserved, limit=recipe.images)
    else:
        raise ValueError(f"unknown pretraining source {recipe.source!r}; use fashion_mnist_heldout or mnist_digits")
    return images[: recipe.images], labels[: recipe.images]


def ensure_demo_weights(preset_name: str, recipe: PretrainRecipe | None = None) -> Path:
    """Path of the cached pretrained weights for a demo preset, pretraining them first if needed."""
    recipe = recipe or DEMO_RECIPES[preset_name]
    path = demo_weights_path(preset_name, recipe)
    if path.is_file():
        return path
    preset = PRESETS[preset_name]
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, labels = _source_images(recipe)
    n_classes = int(labels.max()) + 1
    order = torch.randperm(len(images))
    n_eval = int(len(images) * recipe.holdout_fraction)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    model = timm.create_model(preset.timm_name, pretrained=False, num_classes=n_classes, **preset.model_kwargs)
    size = preset.model_kwargs.get("img_size", 224)
    # the preset's own mean/std (demo presets: 0/1, inputs in [0, 1]), which every stream then feeds it
    to_input = v2.Compose([v2.Resize(size, antialias=True), v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(list(preset.mean), list(preset.std))])

    def batch_input(idx: torch.Tensor, train: bool) -> torch.Tensor:
        x = to_input(images[idx].expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[idx])
        return torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x) if train else x

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    log.info("pretraining %s on %d %s images for %d epochs (once; cached at %s)", preset_name, len(train_idx), recipe.source, recipe.epochs, path)
    model.train()
    for _ in range(recipe.epochs):
        for idx in train_idx[torch.randperm(len(train_idx))].split(recipe.batch_size):
            loss = F.cross_entropy(model(batch_input(idx, True)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        correct = sum((model(batch_input(idx, False)).argmax(1) == labels[idx]).sum().item() for idx in eval_idx.split(512))
    accuracy = 100.0 * correct / max(len(eval_idx), 1)
    seconds = time.perf_counter() - started
    log.info("pretrained %s: %.1f%% held-out accuracy on %s (%.0fs)", preset_name, accuracy, recipe.source, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    meta = dict(preset=preset_name, recipe=asdict(recipe), heldout_accuracy=accuracy, seconds=seconds, timm=timm.__version__)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)  # last: a crash mid-write never leaves a file that looks finished
    return path
