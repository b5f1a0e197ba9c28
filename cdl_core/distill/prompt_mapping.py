"""CDL-Prompt's prompt mapping: teacher prompts -> student-width prompts by attention over components.

Per teacher prompt layer l: K, A in R^{M x D_t}, P in R^{M x L_m x D_s}. The teacher's prompt at l (key and
value tokens) is averaged over tokens into q_t (B x D_t, detached); alpha_m = cos(q_t * A_m, K_m);
the mapped prompt sum_m alpha_m P_m (B x L_m x D_s) is split into key and value halves.
"""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.backbones import Prefix
from cdl_core.prompts.base import split_prefix, uniform_parameter
from cdl_core.prompts.coda import attend_components
from cdl_core.prompts.orthogonal import orthonormal_extension


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

    def forward(self, teacher_prefixes: dict[int, Prefix]) -> dict[int, Prefix]:
        mapped = {}
        for layer in self.layers:
            key, value = teacher_prefixes[layer]
            batch = max(len(key), len(value))
            tokens = torch.cat((key.expand(batch, -1, -1), value.expand(batch, -1, -1)), dim=1)
            query = tokens.detach().mean(dim=1)  # B x D_t
            k, a, p = (store[str(layer)][: self.active] for store in (self.keys, self.attention, self.components))
            mapped[layer] = split_prefix(attend_components(query, k, a, p))
        return mapped
