"""The "no prompts" control: frozen backbone + head only (DESIGN.md section 4)."""
from __future__ import annotations

import torch

from cdl_core.attach import Attachment
from cdl_core.catalog.prompts import NoPromptParams
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method


@register_prompt_method
class NoPrompt(PromptMethod):
    name = "none"
    Params = NoPromptParams

    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
        return PromptOutput(Attachment(), torch.zeros(()))
