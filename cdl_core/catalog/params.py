"""Resolving a method's parameters: the overrides a config gives, checked against the method's Params dataclass
(whose defaults are the official ones)."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cdl_core.errors import ConfigError

P = TypeVar("P")


def resolve_params(params_cls: type[P], overrides: dict[str, Any], where: str) -> P:
    """`params_cls` filled with `overrides` (lists become tuples); unknown names and negative numbers are refused.
    `where` names the config section in messages, e.g. "prompt.params for coda"."""
    valid = {f.name for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown {', '.join(unknown)}; valid: {', '.join(sorted(valid)) or 'none'}")
    params = params_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(n, (int, float)) and not isinstance(n, bool) and n < 0 for n in numbers):
            raise ConfigError(f"{where}: {f.name}={value!r} must not be negative")
    return params


def resolve_method_params(registry: dict[str, type[P]], kind: str, section: str, method: str, overrides: dict[str, Any]) -> P:
    """The checked params of `method` from a registry of Params classes (each with a `check()`)."""
    if method not in registry:
        raise ConfigError(f"unknown {kind} {method!r}; valid: {', '.join(sorted(registry))}")
    params = resolve_params(registry[method], overrides, f"{section} for {method}")
    params.check()
    return params


def at_least_one(section: str, name: str, value: int | None, why: str = "") -> None:
    """None passes: the field falls back to a default."""
    if value is not None and value < 1:
        raise ConfigError(f"{section}.{name}={value} must be at least 1{why}")


def even_length(section: str, name: str, value: int) -> None:
    if value < 2 or value % 2:
        raise ConfigError(f"{section}.{name}={value} must be an even number >= 2 (key + value halves)")
