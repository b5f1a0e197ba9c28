"""CDL-Prompt's prompt mapping: teacher prompts -> student-width prompts by attention over components.

Per teacher prompt layer l: K, A in R^{M x D_t}, P in R^{M x L_m x D_s}. The teacher's prompt at l (key and
value tokens) is averaged over tokens into q_t (B x D_t, detached); alpha_m = cos(q_t * A_m, K_m);
the mapped prompt sum_m alpha_m P_m (B x L_m x D_s) is split into key and value halves.
"""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.attach import Prefix
from cdl_core.prompts.base import split_prefix, uniform_parameter
from cdl_core.prompts.coda import attend_components
from cdl_core.prompts.orthogonal import orthonormal_extension


def teacher_prompt_queries(teacher_prefixes: dict[int, Prefix], batch: int) -> dict[int, torch.Tensor]:
    """q_t per layer: the mean over the teacher's key and value prompt tokens (B x D_t). All the mapping needs
    from the teacher's prompts, so this (not the prompts) is what a student step receives or caches."""
    queries = {}
    for layer, (key, value) in teacher_prefixes.items():
        tokens = key.shape[1] + value.shape[1]
        queries[layer] = ((key.sum(dim=1) + value.sum(dim=1)) / tokens).expand(batch, -1)
    return queries


class PromptMapping(nn.Module):
    def __init__(self, layers: tuple[int, ...], teacher_dim: int, student_dim: int, components: int, length: int, active: int) -> None:
        super().__init__()
        if not 1 <= active <= components:
            raise ValueError(f"active components {active} must be between 1 and {components}")
        self.layers = tuple(layers)
        self.active = active
        self.keys = nn.ParameterDict({str(l): uniform_parameter(components, teacher_dim) for l in layers})
        self.attention = nn.ParameterDict({str(l): uniform_parameter(components, teacher_dim) for l in layers})
        self.components = nn.ParameterDict({str(l): uniform_parameter(components, length, student_dim) for l in layers})
        with torch.no_grad():
            for store in (self.keys, self.attention, self.components):
                for param in store.values():
                    param[:active] = orthonormal_extension(param[:0], active)

    def forward(self, prompt_queries: dict[int, torch.Tensor]) -> dict[int, Prefix]:
        """`prompt_queries`: `teacher_prompt_queries` of the teacher's prompts (no gradient flows into them)."""
        mapped = {}
        for layer in self.layers:
            k, a, p = (store[str(layer)][: self.active] for store in (self.keys, self.attention, self.components))
            mapped[layer] = split_prefix(attend_components(prompt_queries[layer].detach(), k, a, p))
        return mapped
