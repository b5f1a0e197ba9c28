"""The prompt methods' parameters (official defaults) and the checks a config alone decides: lengths, pools
against the task count, prompted layers against the backbone's depth. The modules are in cdl_core.prompts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from cdl_core.catalog.params import even_length, resolve_method_params
from cdl_core.errors import ConfigError

SECTION = "prompt.params"


class PromptParams:
    """Base of each method's frozen Params dataclass."""

    method: ClassVar[str]
    uses_query: ClassVar[bool] = True  # selects prompts with the frozen query pass's [CLS] feature

    @property
    def prompted_layers(self) -> tuple[int, ...]:
        """Backbone layers that receive prompts."""
        return tuple(getattr(self, "layers", ()))

    def check(self) -> None:
        """What the parameters alone decide; raise ConfigError."""

    def pool_covers_tasks(self, n_tasks: int, needs: str) -> None:
        pool_size = getattr(self, "pool_size")
        if pool_size < n_tasks:
            raise ConfigError(f"{self.method} needs {needs}: {SECTION}.pool_size={pool_size} < {n_tasks} tasks; "
                              "raise pool_size or lower data.n_tasks")

    def check_against(self, n_tasks: int, depth: int, backbone: str) -> None:
        """What the task count and the backbone's depth decide; raise ConfigError."""
        bad = [layer for layer in self.prompted_layers if not 0 <= layer < depth]
        if bad:
            raise ConfigError(
                f"{SECTION} for {self.method}: layers {bad} do not exist in {backbone} (depth {depth}); use layers 0..{depth - 1}"
            )


@dataclass(frozen=True)
class L2PParams(PromptParams):
    method: ClassVar[str] = "l2p"
    pool_size: int = 30
    length: int = 20  # tokens per prompt: length/2 key tokens + length/2 value tokens
    top_k: int = 5
    layers: tuple[int, ...] = (0,)

    def check(self) -> None:
        even_length(SECTION, "length", self.length)
        if not 1 <= self.top_k <= self.pool_size:
            raise ConfigError(f"{SECTION}.top_k={self.top_k} must be between 1 and pool_size={self.pool_size}")


@dataclass(frozen=True)
class DualPromptParams(PromptParams):
    method: ClassVar[str] = "dualprompt"
    pool_size: int = 10  # E-prompts, one per task
    length: int = 20  # E-prompt tokens (key half + value half)
    layers: tuple[int, ...] = (2, 3, 4)  # E-prompt layers
    g_length: int = 6
    g_layers: tuple[int, ...] = (0, 1)

    @property
    def prompted_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.layers) | set(self.g_layers)))

    def check(self) -> None:
        even_length(SECTION, "length", self.length)
        even_length(SECTION, "g_length", self.g_length)

    def check_against(self, n_tasks: int, depth: int, backbone: str) -> None:
        super().check_against(n_tasks, depth, backbone)
        self.pool_covers_tasks(n_tasks, "one E-prompt per task")


@dataclass(frozen=True)
class CodaParams(PromptParams):
    method: ClassVar[str] = "coda"
    pool_size: int = 100  # components in total; pool_size // n_tasks new ones per task
    length: int = 8
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    ortho_mu: float = 0.0  # weight of the orthogonality penalty (0 in the current official code)

    def check(self) -> None:
        even_length(SECTION, "length", self.length)

    def check_against(self, n_tasks: int, depth: int, backbone: str) -> None:
        super().check_against(n_tasks, depth, backbone)
        self.pool_covers_tasks(n_tasks, "at least one component per task")


@dataclass(frozen=True)
class APTParams(PromptParams):
    """Additive prompt tuning: a key and a value row per layer added to the [CLS] token's; no pool, no query."""

    method: ClassVar[str] = "apt"
    uses_query: ClassVar[bool] = False
    # Evaluation uses a merged copy G of the rows: G = rows after task 1, then G = ema * G + (1 - ema) * rows.
    # Official scripts 0.7 (the code's default is 0.5).
    ema: float = 0.7

    def check(self) -> None:
        if not 0.0 <= self.ema <= 1.0:
            raise ConfigError(f"{SECTION}.ema={self.ema} must be in [0, 1]")


@dataclass(frozen=True)
class NoPromptParams(PromptParams):
    method: ClassVar[str] = "none"
    uses_query: ClassVar[bool] = False


PROMPT_PARAMS: dict[str, type[PromptParams]] = {
    cls.method: cls for cls in (L2PParams, DualPromptParams, CodaParams, APTParams, NoPromptParams)
}


def resolve_prompt_params(method: str, overrides: dict[str, Any]) -> PromptParams:
    return resolve_method_params(PROMPT_PARAMS, "prompt method", SECTION, method, overrides)
