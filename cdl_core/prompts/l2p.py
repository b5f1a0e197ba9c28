"""L2P++ (prefix-tuning L2P as in CODA-Prompt's code): a shared prompt pool, top-k by key similarity."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment
from cdl_core.catalog.prompts import L2PParams
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method, split_prefix, uniform_parameter


@register_prompt_method
class L2P(PromptMethod):
    name = "l2p"
    Params = L2PParams

    def __init__(self, params: L2PParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__(params, embed_dim, key_dim, n_tasks, depth)
        self.prompts = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, params.length, embed_dim) for l in params.layers})
        self.keys = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, key_dim) for l in params.layers})

    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
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
        return PromptOutput(Attachment(prefixes), loss)
