"""A continual learner: frozen backbone + prompt method + linear head (+ a KD method's modules for students)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from cdl_core.backbones import FrozenViT, Prefix
from cdl_core.distill import KDMethod
from cdl_core.prompts import PromptMethod


class ModelOutput(NamedTuple):
    features: torch.Tensor  # [CLS] feature of the prompted pass
    logits: torch.Tensor  # the `last` head over all classes of the stream
    prompt_loss: torch.Tensor
    prefixes: dict[int, Prefix]  # this model's own prompts (what a student maps from a teacher)


class ContinualModel(nn.Module):
    def __init__(self, backbone: FrozenViT, prompt: PromptMethod, n_classes: int, kd: KDMethod | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.head = nn.Linear(backbone.embed_dim, n_classes)
        self.kd = kd

    def forward(
        self, images: torch.Tensor, query: torch.Tensor, task_id: int, train: bool,
        teacher_prompt_queries: dict[int, torch.Tensor] | None = None,
    ) -> ModelOutput:
        own = self.prompt(query, task_id, train)
        prefixes = dict(own.prefixes)
        if self.kd is not None and teacher_prompt_queries is not None:
            for layer, (key, value) in self.kd.extra_prefixes(teacher_prompt_queries).items():
                if layer in prefixes:  # student's own prompt tokens, then the mapped teacher prompt tokens
                    own_key, own_value = prefixes[layer]
                    batch = len(images)
                    key = torch.cat((own_key.expand(batch, -1, -1), key), dim=1)
                    value = torch.cat((own_value.expand(batch, -1, -1), value), dim=1)
                prefixes[layer] = (key, value)
        features = self.backbone(images, prefixes)
        return ModelOutput(features, self.head(features), own.loss, own.prefixes)

    def predict(self, out: ModelOutput) -> torch.Tensor:
        return self.kd.predict(out.features, out.logits) if self.kd is not None else out.logits

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone (which is rebuilt from its preset and checked by hash)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
