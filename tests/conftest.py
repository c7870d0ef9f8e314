"""Shared fixtures. Model fixtures (ENGINE): random-weight checkpoints made
once per test session with `make_model` (no model hub here)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory):
    """make_tiny_model(arch="llama", seed=0, **config_overrides) -> Path, cached per session."""
    from fastserve.gpu_worker.model_maker import make_model

    made = {}

    def factory(arch: str = "llama", seed: int = 0, **overrides):
        key = (arch, seed, repr(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"model-{arch}-{seed}")
            made[key] = make_model(out, arch=arch, preset="tiny", seed=seed, **overrides)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model):
    """A tiny llama checkpoint (seed 0) with config.json, model.safetensors and tokenizer files."""
    return make_tiny_model("llama", seed=0)

# Bus fixtures (GATEWAY): memory_bus, rabbit_bus, bus (both), rabbitmq_url, bus_namespace.
from fastserve.common.testing import *  # noqa: E402,F401,F403
