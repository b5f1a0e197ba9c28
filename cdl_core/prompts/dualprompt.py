"""DualPrompt: a task-shared G-prompt in the first layers and a task-specific E-prompt pool above them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment
from cdl_core.catalog.prompts import DualPromptParams
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method, split_prefix, uniform_parameter


@register_prompt_method
class DualPrompt(PromptMethod):
    name = "dualprompt"
    Params = DualPromptParams

    def __init__(self, params: DualPromptParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__(params, embed_dim, key_dim, n_tasks, depth)
        self.e_prompts = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, params.length, embed_dim) for l in params.layers})
        self.e_keys = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, key_dim) for l in params.layers})
        self.g_prompts = nn.ParameterDict({str(l): uniform_parameter(1, params.g_length, embed_dim) for l in params.g_layers})

    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
        q = F.normalize(query, dim=1)
        loss = query.new_zeros(())
        parts: dict[int, list] = {layer: [] for layer in self.layers}
        for layer in self.params.layers:
            cos = q @ F.normalize(self.e_keys[str(layer)], dim=1).T  # B x pool
            if train:  # training knows the task: its own E-prompt, and pull its key toward the queries
                index = torch.full((len(query),), task_id, dtype=torch.long, device=query.device)
                loss = loss + (1.0 - cos[:, task_id]).sum()
            else:
                index = cos.argmax(dim=1)
            parts[layer].append(split_prefix(self.e_prompts[str(layer)][index]))
        for layer in self.params.g_layers:
            parts[layer].append(split_prefix(self.g_prompts[str(layer)]))
        prefixes = {}
        for layer, pieces in parts.items():
            keys = [k.expand(len(query), -1, -1) for k, _ in pieces]
            values = [v.expand(len(query), -1, -1) for _, v in pieces]
            prefixes[layer] = (torch.cat(keys, dim=1), torch.cat(values, dim=1))
        return PromptOutput(Attachment(prefixes), loss)
