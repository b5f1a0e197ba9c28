"""APT (additive prompt tuning, arXiv 2503.07979): a key and a value row per layer added to the [CLS] token's own.

One shared tensor of 2*depth rows of width D: in layer l row 2l is added to the [CLS] token's key and row 2l+1 to
its value (each head its slice), so the sequence length never changes; there is no pool, no query, no selection
and no extra loss. The rows keep training from task to task. After each task a merged copy G takes them in
(G = rows after the first task, then G = ema*G + (1-ema)*rows) and evaluation uses G. Quirk of the official code:
its frozen teacher computes its students' signal in eval mode before that task's merge, i.e. with G from the
previous tasks (all zeros on the first); `merged="previous"` gives that view.
"""
from __future__ import annotations

import torch
from torch import nn

from cdl_core.attach import Attachment
from cdl_core.catalog.prompts import APTParams
from cdl_core.prompts.base import PromptMethod, PromptOutput, register_prompt_method, zero_loss

MERGED_VIEWS = ("current", "previous")


@register_prompt_method
class APT(PromptMethod):
    name = "apt"
    Params = APTParams
    head = "cosine"

    def __init__(self, params: APTParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__(params, embed_dim, key_dim, n_tasks, depth)
        self.depth = depth
        self.prompts = nn.Parameter(torch.empty(2 * depth, embed_dim))
        nn.init.trunc_normal_(self.prompts, std=0.02)
        # Buffers, so checkpoints (state dicts) carry them; zeros until the first end_task.
        self.register_buffer("merged", torch.zeros(2 * depth, embed_dim))
        self.register_buffer("merged_previous", torch.zeros(2 * depth, embed_dim))  # G before the last end_task

    @torch.no_grad()
    def end_task(self, task_id: int) -> None:
        self.merged_previous.copy_(self.merged)
        rows = self.prompts.detach()
        if task_id == 0:
            self.merged.copy_(rows)
        else:
            ema = self.params.ema
            self.merged.copy_(ema * self.merged + (1.0 - ema) * rows)

    def rows(self, train: bool, merged: str = "current") -> torch.Tensor:
        """The 2*depth rows a pass adds: the live prompts in training, else the chosen merged copy."""
        if merged not in MERGED_VIEWS:
            raise ValueError(f"merged={merged!r}; valid: {', '.join(MERGED_VIEWS)}")
        if train:
            return self.prompts
        return self.merged if merged == "current" else self.merged_previous

    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
        rows = self.rows(train, merged)
        cls_kv = {layer: (rows[2 * layer : 2 * layer + 1], rows[2 * layer + 1 : 2 * layer + 2]) for layer in range(self.depth)}
        return PromptOutput(Attachment(cls_kv=cls_kv), zero_loss(rows))
