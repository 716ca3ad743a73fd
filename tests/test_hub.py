import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conch import hub
from conch.errors import ConchError


def test_auto_without_gpu_is_demo(monkeypatch, demo_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resolved = hub.resolve("auto")
    assert resolved.name == "demo" and resolved.path == demo_path
    assert "no CUDA GPU" in resolved.why


def test_auto_with_gpu_is_the_target_model(monkeypatch, tmp_path):
    asked = {}

    def fake_download(repo_id, **kw):
        asked["repo_id"] = repo_id
        return tmp_path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hub, "download", fake_download)
    resolved = hub.resolve("auto")
    assert asked["repo_id"] == hub.TARGET_MODEL == resolved.name
    assert "CUDA GPU is available" in resolved.why


def test_local_folder_is_used_as_is(tiny_r1):
    resolved = hub.resolve(str(tiny_r1))
    assert resolved.path == Path(tiny_r1).resolve() and "local folder" in resolved.why


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConchError, match="no config.json"):
        hub.resolve(str(tmp_path))


def test_env_overrides_only_auto(monkeypatch, tiny_r1, demo_path):
    monkeypatch.setenv("CONCH_BASE_MODEL", str(tiny_r1))
    resolved = hub.resolve("auto")
    assert resolved.path == Path(tiny_r1).resolve() and "CONCH_BASE_MODEL" in resolved.why
    assert hub.resolve(None).path == Path(tiny_r1).resolve()  # no setting is auto
    assert hub.resolve("demo").path == demo_path  # an explicit model is never overridden
    assert "CONCH_BASE_MODEL" not in hub.resolve("demo").why


@pytest.mark.parametrize("bad", ["not a model", "/no/such/folder", "a/b/c"])
def test_nonsense_setting_is_one_sentence(bad):
    with pytest.raises(ConchError, match="neither 'auto', 'demo'"):
        hub.resolve(bad)


def _fake_hub(tiny_r1, calls):
    """A stand-in for snapshot_download that lays files out the way the hub cache does."""

    def snapshot_download(repo_id, cache_dir=None, endpoint=None, allow_patterns=None, revision=None, **kw):
        calls.append(dict(repo_id=repo_id, cache_dir=cache_dir, endpoint=endpoint, patterns=allow_patterns))
        org, name = repo_id.split("/")
        snap = Path(cache_dir) / f"models--{org}--{name}" / "snapshots" / "0123abc"
        if not snap.exists():
            shutil.copytree(tiny_r1, snap)
        return str(snap)

    return snapshot_download


def test_hub_id_downloads_through_the_mirror(monkeypatch, tmp_path, tiny_r1):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tiny_r1, calls))
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    resolved = hub.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", cache_dir=str(tmp_path))
    assert resolved.path.name == "0123abc" and (resolved.path / "config.json").exists()
    assert calls[0]["endpoint"] == "https://hf-mirror.com"
    assert "*.safetensors" in calls[0]["patterns"]
    again = hub.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", cache_dir=str(tmp_path))
    assert again.path == resolved.path  # a second call reuses the same snapshot


def test_modelscope_source(monkeypatch, tmp_path, tiny_r1):
    calls = []
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = _fake_hub(tiny_r1, calls)
    fake.__spec__ = types.SimpleNamespace(name="modelscope")
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: object())
    path = hub.download("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", source="modelscope", cache_dir=str(tmp_path))
    assert (path / "config.json").exists() and calls[0]["repo_id"].startswith("deepseek-ai/")


def test_modelscope_missing_says_how_to_install(monkeypatch):
    real = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda n: None if n == "modelscope" else real(n))
    with pytest.raises(ConchError, match="pip install modelscope"):
        hub.download("org/model", source="modelscope")


def test_unknown_source():
    with pytest.raises(ConchError, match="huggingface, mirror, modelscope"):
        hub.download("org/model", source="ollama")


def test_unreachable_hub_names_the_ways_out(monkeypatch, tmp_path):
    """The real huggingface_hub against a closed local port: one sentence, no traceback."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConchError) as info:
        hub.download("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "HF_ENDPOINT" in message and "source=mirror" in message and "modelscope" in message
    assert "base_model=demo" in message
    assert "\n" not in message


def test_demo_conversion_keeps_the_gguf_logits(demo_path):
    from transformers import AutoModelForCausalLM, GgufConfig

    gguf = hub.demo_gguf_path()
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    converted, tokenizer = hub.load_model(demo_path)
    ids = tokenizer("The Krusty Krab sells Krabby Patties.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, converted(ids).logits)


def test_demo_is_reused_not_reconverted(demo_path, monkeypatch):
    monkeypatch.setattr(hub, "demo_gguf_path", lambda: pytest.fail("converted again"))
    assert hub.ensure_demo(demo_path) == demo_path


def test_cpu_device_is_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device = hub.pick_device()
    assert device.device in ("cpu", "mps") and (device.dtype == torch.float32 or device.device == "mps")


def test_mirror_source_downloads_from_hf_mirror(monkeypatch, tmp_path, tiny_r1):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tiny_r1, calls))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    hub.resolve("org/model", source="mirror", cache_dir=str(tmp_path))
    assert calls[0]["endpoint"] == "https://hf-mirror.com" and calls[0]["cache_dir"] == str(tmp_path)


def test_a_download_is_recorded_and_found_without_the_network(monkeypatch, tmp_path, tiny_r1, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tiny_r1, calls))
    first = hub.resolve("org/model", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded twice"))
    again = hub.resolve("org/model")  # no cache_dir given: the settings file knows the folder
    assert again.path == first.path and len(calls) == 1
    assert str(first.path) in again.why and "conch_settings.yaml" in again.why
    assert f"found at {first.path}" in capsys.readouterr().out


def test_an_incomplete_recorded_folder_is_downloaded_again(monkeypatch, tmp_path, tiny_r1):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(tiny_r1, calls))
    first = hub.resolve("org/model", cache_dir=str(tmp_path))
    for weights in first.path.glob("*.safetensors"):
        weights.unlink()  # e.g. deleted to free disk space
    assert hub.resolve("org/model", cache_dir=str(tmp_path)).path == first.path and len(calls) == 2


def test_auto_with_a_gpu_finds_the_target_model_downloaded_earlier(monkeypatch, tmp_path, tiny_r1):
    from conch import settings

    snapshot = tmp_path / "snap"
    shutil.copytree(tiny_r1, snapshot)
    settings.remember_model(hub.TARGET_MODEL, snapshot, "mirror")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("downloaded twice"))
    assert hub.resolve("auto").path == snapshot.resolve()


def test_fetch_saves_the_choice_for_later_kernels(monkeypatch, tiny_r1, demo_path):
    from conch import settings

    resolved = hub.fetch(str(tiny_r1), source="modelscope")
    saved = settings.read_file()
    assert saved == {"base_model": str(Path(tiny_r1).resolve()), "source": "modelscope"}
    later = hub.resolve("auto")  # a fresh kernel of a later notebook
    assert later.path == resolved.path and "conch_settings.yaml sets base_model" in later.why
    assert hub.fetch("auto").path == resolved.path  # auto keeps the saved choice (notebook 02 run again)
    settings.save(base_model=None)  # deleting the line: back to the GPU/CPU rule
    assert hub.fetch("auto").path == demo_path and settings.read_file() == {"source": "modelscope"}


def test_fetch_refuses_an_unknown_source_before_anything_else():
    with pytest.raises(ConchError, match="huggingface, mirror, modelscope"):
        hub.fetch("demo", source="hf-mirror")


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_threads_and_a_bad_conch_threads(monkeypatch, keep_threads):
    monkeypatch.setenv("CONCH_THREADS", "1")
    assert hub.set_threads() == 1 == torch.get_num_threads()
    assert hub.set_threads(1) == 1
    monkeypatch.setenv("CONCH_THREADS", "two")
    with pytest.raises(ConchError, match="CONCH_THREADS='two' must be a whole number"):
        hub.set_threads()


def _ticks(*windows, cores=2):
    """Fake (total, idle, own) readings: each window is (other processes' busy cores, own busy cores)."""
    readings, total, idle, own = [(0, 0, 0)], 0, 0, 0
    for others, mine in windows:
        total, idle, own = total + 100 * cores, idle + round(100 * (cores - others - mine)), own + round(100 * mine)
        readings.append((total, idle, own))
    return iter(readings).__next__


def test_busy_cores_ignores_a_burst_but_sees_a_steady_load(monkeypatch):
    monkeypatch.setattr(hub.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    burst = _ticks((2.0, 0), (2.0, 0), (0.0, 0))  # another process busy at the start only
    assert hub.busy_cores(2, windows=3, sample=burst) == 0.0
    steady = _ticks((1.0, 0), (1.0, 0), (1.0, 0))
    assert hub.busy_cores(2, windows=3, sample=steady) == pytest.approx(1.0)
    own = _ticks((0.0, 2.0), (0.0, 2.0), (0.0, 2.0))  # only this process is busy: nothing to leave free
    assert hub.busy_cores(2, windows=3, sample=own) == 0.0


def test_threads_follow_the_free_cores(monkeypatch, keep_threads):
    monkeypatch.delenv("CONCH_THREADS", raising=False)
    monkeypatch.setattr(hub.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(hub, "busy_cores", lambda cores: 1.0)
    assert hub.set_threads() == 1
    monkeypatch.setattr(hub, "busy_cores", lambda cores: 0.2)
    assert hub.set_threads() == 2


def test_real_proc_readings_are_sane():
    total, idle, own = hub.cpu_ticks()
    assert total >= idle >= 0 and own >= 0
    assert 0.0 <= hub.busy_cores(os.cpu_count() or 1, windows=1, seconds=0.05) <= (os.cpu_count() or 1)
