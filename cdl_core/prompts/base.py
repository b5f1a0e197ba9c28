"""The one interface every prompt method implements, and its registry."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from cdl_core.attach import Attachment, Prefix
from cdl_core.catalog.prompts import PromptParams, resolve_prompt_params
from cdl_core.errors import ConfigError


class PromptOutput(NamedTuple):
    attachment: Attachment  # what the prompts attach to the backbone
    loss: torch.Tensor  # scalar prompt loss (key matching, orthogonality); 0 when there is none

    @property
    def prefixes(self) -> dict[int, Prefix]:
        return self.attachment.prefixes


class PromptMethod(nn.Module, ABC):
    """Turns a selection query into what the prompts attach to the backbone (`cdl_core.attach.Attachment`).

    Lifecycle: `begin_task(t)` once before training task t, `forward(query, task_id, train)` per batch, and
    `end_task(t)` after training task t, before it is evaluated.
    """

    name: ClassVar[str]
    Params: ClassVar[type[PromptParams]]  # the method's parameters (cdl_core.catalog.prompts); defaults official
    head: ClassVar[str] = "linear"  # the classifier kind its model uses (cdl_core.model.HEADS)

    def __init__(self, params: PromptParams, embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> None:
        super().__init__()
        params.check_against(n_tasks, depth, f"a backbone of depth {depth}")
        self.params = params
        self.embed_dim = embed_dim
        self.key_dim = key_dim
        self.n_tasks = n_tasks
        self.current_task = -1

    @classmethod
    def resolve_params(cls, overrides: dict[str, Any]) -> PromptParams:
        return resolve_prompt_params(cls.name, overrides)

    @property
    def layers(self) -> tuple[int, ...]:
        """Backbone layers that receive prompts."""
        return self.params.prompted_layers

    def begin_task(self, task_id: int) -> None:
        self.current_task = task_id

    def end_task(self, task_id: int) -> None:
        """After training task `task_id`, before it is evaluated."""

    @abstractmethod
    def forward(self, query: torch.Tensor | None, task_id: int, train: bool, merged: str = "current") -> PromptOutput:
        """`query`: the selection query (None for methods whose Params do not use one). `merged`: for methods
        that evaluate with a merged copy of their prompts (APT), which copy an evaluation pass uses: "current"
        (after the last finished task) or "previous" (before it)."""


PROMPT_METHODS: dict[str, type[PromptMethod]] = {}


def register_prompt_method(cls: type[PromptMethod]) -> type[PromptMethod]:
    PROMPT_METHODS[cls.name] = cls
    return cls


def build_prompt_method(method: str, overrides: dict[str, Any], embed_dim: int, key_dim: int, n_tasks: int, depth: int) -> PromptMethod:
    if method not in PROMPT_METHODS:
        raise ConfigError(f"unknown prompt method {method!r}; valid: {', '.join(sorted(PROMPT_METHODS))}")
    cls = PROMPT_METHODS[method]
    return cls(cls.resolve_params(overrides), embed_dim, key_dim, n_tasks, depth)


def uniform_parameter(*shape: int) -> nn.Parameter:
    """Prompts, keys and attention vectors start uniform in [0, 1) as in the official code."""
    return nn.Parameter(torch.rand(*shape))


def split_prefix(prompt: torch.Tensor) -> Prefix:
    """Prefix tuning: the first half of a prompt's tokens extends the keys, the second half the values."""
    half = prompt.shape[-2] // 2
    return prompt[..., :half, :], prompt[..., half:, :]


def zero_loss(reference: torch.Tensor) -> torch.Tensor:
    return reference.new_zeros(())
