"""Shared test fixtures.

Every test runs on the CPU with small, randomly initialised backbones; nothing here may download weights or
pretrain the demo backbones. The cache directory is redirected to a temporary folder for the whole session,
and the Hugging Face hub is put in offline mode before anything imports it.
"""
from __future__ import annotations

import os

# Before timm / huggingface_hub are imported (they read this once): no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def isolated_cdl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """CDL_CACHE_DIR points at a fresh temporary folder, so tests never read or write ~/.cache/cdl."""
    path = str(tmp_path_factory.mktemp("cdl_cache"))
    previous = os.environ.get("CDL_CACHE_DIR")
    os.environ["CDL_CACHE_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("CDL_CACHE_DIR", None)
    else:
        os.environ["CDL_CACHE_DIR"] = previous


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread() -> Iterator[None]:
    """The test models are tiny: intra-op threading only adds synchronisation overhead, and on a loaded
    2-core machine it made a 64-wide linear layer ~75x slower. One thread keeps the suite fast."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def forbid_demo_pretraining(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly instead of pretraining a demo backbone (minutes of CPU) if a test asks for default weights."""
    import cdl_core.pretrain

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a test tried to pretrain a demo backbone; use weights='random' or a file")

    monkeypatch.setattr(cdl_core.pretrain, "ensure_demo_weights", refuse)


@pytest.fixture
def make_config() -> Callable[..., Any]:
    """Factory for a small, validated RunConfig: synthetic stream, random demo-s student, CPU, batch 8."""
    from cdl_core.config import BackboneConfig, DataConfig, PromptConfig, RunConfig, TrainConfig

    def factory(
        method: str = "l2p",
        *,
        prompt_params: dict[str, Any] | None = None,
        n_tasks: int = 2,
        train_per_class: int = 6,
        test_per_class: int = 4,
        val_fraction: float = 0.0,
        train_augment: bool = True,
        epochs: int = 1,
        batch_size: int = 8,
        lr: float = 1e-3,
        seed: int = 0,
        preset: str = "demo-s",
    ) -> RunConfig:
        return RunConfig(
            data=DataConfig(
                name="synthetic", n_tasks=n_tasks, train_per_class=train_per_class, test_per_class=test_per_class,
                val_fraction=val_fraction, train_augment=train_augment,
            ),
            student=BackboneConfig(preset=preset, weights="random"),
            prompt=PromptConfig(method=method, params=dict(prompt_params or {})),
            train=TrainConfig(epochs=epochs, batch_size=batch_size, eval_batch_size=64, lr=lr, seed=seed, device="cpu"),
        ).validate()

    return factory
