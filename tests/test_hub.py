import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conch import hub, paths
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


def test_hub_id_downloads_through_the_mirror(monkeypatch, tmp_path, fake_snapshot_download):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    calls = fake_snapshot_download.calls
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    resolved = hub.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", cache_dir=str(tmp_path))
    assert resolved.path.name == "0123abc" and (resolved.path / "config.json").exists()
    assert calls[0]["endpoint"] == "https://hf-mirror.com" and calls[0]["xet_off"]  # Xet would go around the mirror
    assert "*.safetensors" in calls[0]["patterns"]
    again = hub.resolve("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", cache_dir=str(tmp_path))
    assert again.path == resolved.path  # a second call reuses the same snapshot


def test_modelscope_source(monkeypatch, tmp_path, fake_snapshot_download):
    calls = fake_snapshot_download.calls
    fake = types.ModuleType("modelscope")
    fake.snapshot_download = fake_snapshot_download
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
    with hub.gguf_parsed_once():  # read once here as well; the converted folder came from its own reading
        original = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    converted, tokenizer = hub.load_model(demo_path)
    ids = tokenizer("The Krusty Krab sells Krabby Patties.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(original(ids).logits, converted(ids).logits)


def test_demo_is_reused_not_reconverted(demo_path, monkeypatch):
    monkeypatch.setattr(hub, "demo_gguf_path", lambda: pytest.fail("converted again"))
    assert hub.ensure_demo(demo_path) == demo_path


def test_mirror_source_downloads_from_hf_mirror(monkeypatch, tmp_path, fake_snapshot_download):
    import huggingface_hub

    calls = fake_snapshot_download.calls
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    hub.resolve("org/model", source="mirror", cache_dir=str(tmp_path))
    assert calls[0]["endpoint"] == "https://hf-mirror.com" and calls[0]["cache_dir"] == str(tmp_path)


def test_a_download_is_recorded_and_found_without_the_network(monkeypatch, tmp_path, fake_snapshot_download, capsys):
    import huggingface_hub

    calls = fake_snapshot_download.calls
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    first = hub.resolve("org/model", cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded twice"))
    again = hub.resolve("org/model")  # no cache_dir given: the settings file knows the folder
    assert again.path == first.path and len(calls) == 1
    assert str(first.path) in again.why and "conch_settings.yaml" in again.why
    assert f"found at {paths.shown(first.path)}" in capsys.readouterr().out


def test_an_incomplete_recorded_folder_is_downloaded_again(monkeypatch, tmp_path, fake_snapshot_download):
    import huggingface_hub

    calls = fake_snapshot_download.calls
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
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


def test_shown_paths_are_relative_to_where_the_learner_is(tmp_path, monkeypatch):
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.shown(tmp_path / "repo" / "models" / "demo") == "models/demo"
    assert paths.shown("outputs/x") == "outputs/x"
    assert paths.shown(tmp_path / "repo") == "."
    assert paths.shown(tmp_path / "home" / "autodl-tmp" / "m") == "~/autodl-tmp/m"
    assert paths.shown("/elsewhere/m") == "/elsewhere/m"


def test_gguf_parsed_once_shares_one_reader_a_file_and_restores_gguf(tmp_path):
    import gguf
    import numpy as np
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    # transformers imports both from gguf when it loads (not at its own import): what the block swaps is what it uses
    assert not hasattr(gguf_utils, "GGUFReader") and not hasattr(gguf_utils, "get_tensor_name_map")
    with hub.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and isinstance(first, reader_class)
        assert first.fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is reader_class and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(path) is not first
