"""CODA-Prompt: prompts assembled from a growing set of components weighted by attention to the query."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cdl_core.attach import Attachment
from cdl_core.catalog.prompts import CodaParams
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method, split_prefix, uniform_parameter
from cdl_core.prompts.orthogonal import orthonormal_extension

log = logging.getLogger(__name__)


def attend_components(query: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """alpha_m = cos(query * A_m, K_m); returns sum_m alpha_m P_m. query B x D, keys/attention M x D,
    components M x L x E -> B x L x E. Shared with CDL-Prompt's mapping module."""
    attended = F.normalize(query.unsqueeze(1) * attention.unsqueeze(0), dim=2)  # B x M x D
    alpha = (attended * F.normalize(keys, dim=1).unsqueeze(0)).sum(dim=2)  # B x M
    return torch.einsum("bm,mle->ble", alpha, components)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(t.shape[0], -1)
    return ((flat @ flat.T - torch.eye(flat.shape[0], device=t.device, dtype=t.dtype)) ** 2).mean()


@register_prompt_method
class CodaPrompt(PromptMethod):
    name = "coda"
    Params = CodaParams

    def __init__(self, params: CodaParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__(params, embed_dim, key_dim, n_tasks, depth)
        self.per_task = params.pool_size // n_tasks
        if params.pool_size > key_dim:
            log.warning(
                "coda: %d components in a %d-dim query space cannot all be orthogonal; each task's new components "
                "are made orthogonal to the most recent earlier ones that fit", params.pool_size, key_dim,
            )
        self.components = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, params.length, embed_dim) for l in params.layers})
        self.keys = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, key_dim) for l in params.layers})
        self.attention = nn.ParameterDict({str(l): uniform_parameter(params.pool_size, key_dim) for l in params.layers})

    def task_slice(self, task_id: int) -> tuple[int, int]:
        """Components [start, stop) that task `task_id` adds."""
        return task_id * self.per_task, (task_id + 1) * self.per_task

    @torch.no_grad()
    def begin_task(self, task_id: int) -> None:
        super().begin_task(task_id)
        start, stop = self.task_slice(task_id)
        for store in (self.components, self.keys, self.attention):
            for param in store.values():
                param[start:stop] = orthonormal_extension(param[:start], stop - start)

    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
        start, stop = self.task_slice(self.current_task)
        loss = query.new_zeros(())
        prefixes = {}
        for layer in self.layers:
            k, a, p = (store[str(layer)][:stop] for store in (self.keys, self.attention, self.components))
            if train:  # earlier tasks' components are frozen: they only take part in the forward pass
                k, a, p = (torch.cat((t[:start].detach(), t[start:])) for t in (k, a, p))
                if self.params.ortho_mu > 0:
                    loss = loss + self.params.ortho_mu * (ortho_penalty(k) + ortho_penalty(a) + ortho_penalty(p))
            prefixes[layer] = split_prefix(attend_components(query, k, a, p))
        return PromptOutput(Attachment(prefixes), loss)
