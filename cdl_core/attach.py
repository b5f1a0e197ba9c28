"""The prompted-forward contract: what prompt and distillation methods attach to a frozen ViT.

A method returns an `Attachment` saying what it adds; the model merges its methods' attachments and the backbone
(`cdl_core.backbones.FrozenViT`) applies the result in one place. No method touches the backbone's blocks.

- `prefixes[layer]`: key and value tokens prepended to that layer's keys and values (prefix tuning: L2P,
  DualPrompt, CODA, CDL-Prompt's mapped prompts, D-CDL's KD prefixes). Queries are unchanged.
- `tokens`: extra tokens in the sequence from the first block on, after [CLS], without a position embedding
  (D-CDL's KD token, the DeiT token); their outputs after the final norm come back as `BackboneOutput.tokens`.
- `cls_kv[layer]`: a key and a value vector added to the [CLS] token's own (APT).
- `taps`: blocks whose output tokens (before the final norm) come back as `BackboneOutput.taps` (FitNets, ReviewKD).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Prefix = tuple[torch.Tensor, torch.Tensor]  # (key tokens, value tokens), each (B or 1, L, D)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, *t.shape[1:])


@dataclass
class Attachment:
    prefixes: dict[int, Prefix] = field(default_factory=dict)
    tokens: torch.Tensor | None = None  # (B or 1, n, D)
    cls_kv: dict[int, Prefix] = field(default_factory=dict)  # layer -> (key, value), each (B or 1, D)
    taps: frozenset[int] = frozenset()

    def merge(self, other: "Attachment", batch: int) -> "Attachment":
        """Both attachments at once: prefixes and tokens concatenated (self's first), [CLS] additions summed."""
        prefixes = dict(self.prefixes)
        for layer, (key, value) in other.prefixes.items():
            if layer in prefixes:
                own_key, own_value = prefixes[layer]
                key = torch.cat((_batched(own_key, batch), _batched(key, batch)), dim=1)
                value = torch.cat((_batched(own_value, batch), _batched(value, batch)), dim=1)
            prefixes[layer] = (key, value)
        cls_kv = dict(self.cls_kv)
        for layer, (key, value) in other.cls_kv.items():
            if layer in cls_kv:
                key, value = cls_kv[layer][0] + key, cls_kv[layer][1] + value
            cls_kv[layer] = (key, value)
        tokens = self.tokens if other.tokens is None else other.tokens
        if self.tokens is not None and other.tokens is not None:
            tokens = torch.cat((_batched(self.tokens, batch), _batched(other.tokens, batch)), dim=1)
        return Attachment(prefixes, tokens, cls_kv, self.taps | other.taps)


class BackboneOutput(NamedTuple):
    cls: torch.Tensor  # (B, D) [CLS] after the final norm
    tokens: torch.Tensor | None  # (B, n, D) the attached tokens after the final norm; None when none were attached
    taps: dict[int, torch.Tensor]  # block -> (B, N, D) its output tokens before the final norm


class ModelOutput(NamedTuple):
    """What a prompted continual model (`cdl_core.model.ContinualModel`) gives for a batch."""

    features: torch.Tensor  # (B, D) [CLS] feature of the prompted pass
    logits: torch.Tensor  # the `last` head over all classes of the stream
    prompt_loss: torch.Tensor
    prompts: Attachment  # the prompt method's own attachment (what a student maps from a teacher)
    tokens: torch.Tensor | None  # (B, n, D) outputs of the tokens a KD method attached
    taps: dict[int, torch.Tensor]  # block -> its output tokens, for the blocks a KD method tapped
