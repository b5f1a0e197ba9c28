"""A continual learner: frozen backbone + prompt method + classifier head (+ a KD method's modules for students).

The model merges what its prompt method and KD method attach (`cdl_core.attach`) and hands the result to the
backbone, which applies it in one place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment, ModelOutput
from cdl_core.backbones import FrozenViT
from cdl_core.distill import KDMethod, TeacherSignal
from cdl_core.prompts import PromptMethod


class CosineHead(nn.Module):
    """APT's classifier: LayerNorm on the feature (its affine parameters are not trained in the official code, so
    it has none here), then the cosine with each normalised weight row, plus a bias."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.linear = nn.Linear(dim, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(features) @ F.normalize(self.linear.weight, dim=1).T + self.linear.bias


HEADS: dict[str, type[nn.Module]] = {"linear": nn.Linear, "cosine": CosineHead}


def make_head(kind: str, dim: int, n_classes: int) -> nn.Module:
    return HEADS[kind](dim, n_classes)


class ContinualModel(nn.Module):
    def __init__(self, backbone: FrozenViT, prompt: PromptMethod, n_classes: int, kd: KDMethod | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.prompt = prompt
        self.head = make_head(prompt.head, backbone.embed_dim, n_classes)
        self.kd = kd

    def forward(
        self, images: torch.Tensor, query: torch.Tensor | None, task_id: int, train: bool,
        teacher: TeacherSignal | None = None, merged: str = "current", taps: frozenset[int] = frozenset(),
    ) -> ModelOutput:
        """`teacher`: the teacher's signal for this batch (what a student's KD method reads); `merged`: which merged
        copy of its prompts an evaluation pass uses (`PromptMethod.forward`); `taps`: blocks whose outputs to return
        beyond what the methods tap (a teacher's features for its student)."""
        own = self.prompt(query, task_id, train, merged)
        attachment = own.attachment
        if self.kd is not None:
            attachment = attachment.merge(self.kd.attachment(len(images), train, teacher), len(images))
        if taps:
            attachment = attachment.merge(Attachment(taps=taps), len(images))
        out = self.backbone(images, attachment)
        return ModelOutput(out.cls, self.head(out.cls), own.loss, own.attachment, out.tokens, out.taps)

    def predict(self, out: ModelOutput) -> torch.Tensor:
        return self.kd.predict(out) if self.kd is not None else out.logits

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
