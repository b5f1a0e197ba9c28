"""L2P++ (prefix-tuning L2P as in CODA-Prompt's code): a shared prompt pool, top-k by key similarity."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.config import ConfigError
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method, split_prefix, uniform_parameter


@dataclass(frozen=True)
class L2PParams:
    pool_size: int = 30
    length: int = 20  # tokens per prompt: length/2 key tokens + length/2 value tokens
    top_k: int = 5
    layers: tuple[int, ...] = (0,)


@register_prompt_method
class L2P(PromptMethod):
    name = "l2p"
    Params = L2PParams

    def __init__(self, params: L2PParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__(params, embed_dim, key_dim, n_tasks, depth)
        self.prompts = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, params.length, embed_dim) for l in params.layers})
        self.keys = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, key_dim) for l in params.layers})

    @classmethod
    def check_params(cls, params: L2PParams) -> None:
        if params.length < 2 or params.length % 2:
            raise ConfigError(f"prompt.params.length={params.length} must be an even number >= 2 (key + value halves)")
        if not 1 <= params.top_k <= params.pool_size:
            raise ConfigError(f"prompt.params.top_k={params.top_k} must be between 1 and pool_size={params.pool_size}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.params.layers)

    def forward(self, query: torch.Tensor, task_id: int, train: bool) -> PromptOutput:
        q = F.normalize(query, dim=1)
        prefixes = {}
        loss = query.new_zeros(())
        for layer in self.layers:
            cos = q @ F.normalize(self.keys[str(layer)], dim=1).T  # B x pool
            top = cos.topk(self.params.top_k, dim=1)
            if train:
                loss = loss + (1.0 - top.values).sum()
            chosen = self.prompts[str(layer)][top.indices]  # B x k x length x D
            key, value = split_prefix(chosen)
            prefixes[layer] = (key.flatten(1, 2), value.flatten(1, 2))
        return PromptOutput(prefixes, loss)
