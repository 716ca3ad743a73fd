"""The learner's settings: file, environment and the AutoDL data-disk defaults."""

import pytest

from conch import settings
from conch.errors import ConchError


@pytest.fixture
def autodl(tmp_path, monkeypatch):
    disk = tmp_path / "autodl-tmp"
    disk.mkdir()
    monkeypatch.setenv("CONCH_DATA_DISK", str(disk))
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "MODELSCOPE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return disk


def test_defaults_without_a_data_disk(monkeypatch):
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    s = settings.load()
    assert (s.source, s.endpoint, s.cache_dir, s.base_model, s.models) == ("huggingface", None, None, None, {})


def test_on_autodl_the_cache_is_on_the_data_disk_and_the_source_is_the_mirror(autodl):
    s = settings.load()
    assert s.cache_dir == str(autodl / "model-cache") and s.source == "mirror"
    assert s.endpoint == settings.MIRROR and "data disk" in s.origin["cache_dir"]
    assert str(autodl / "model-cache") in str(s)  # the printed summary says it, with where it came from


def test_the_learners_own_hf_home_wins_over_the_data_disk(autodl, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "my-hf"))
    s = settings.load()
    assert s.cache_dir is None and s.origin["cache_dir"].startswith("HF_HOME=")


def test_arguments_then_environment_then_file(autodl, monkeypatch, tmp_path):
    settings.save(source="modelscope", cache_dir=str(tmp_path / "from-file"))
    assert settings.load().source == "modelscope" and settings.load().cache_dir == str(tmp_path / "from-file")
    monkeypatch.setenv("CONCH_MODEL_SOURCE", "huggingface")
    monkeypatch.setenv("CONCH_CACHE_DIR", str(tmp_path / "from-env"))
    s = settings.load()
    assert (s.source, s.cache_dir, s.origin["source"]) == ("huggingface", str(tmp_path / "from-env"),
                                                           "CONCH_MODEL_SOURCE")
    s = settings.load(source="mirror", cache_dir=str(tmp_path / "arg"))
    assert (s.source, s.cache_dir, s.endpoint) == ("mirror", str(tmp_path / "arg"), settings.MIRROR)
    assert settings.load(source="auto").source == "huggingface"  # auto: not chosen here


def test_hf_endpoint_names_the_server(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://example.org/")
    assert settings.load(source="mirror").endpoint == "https://example.org"
    assert settings.load(source="modelscope").endpoint is None


def test_save_removes_none_and_writes_nothing_when_empty():
    path = settings.save(base_model=None)
    assert not path.exists()  # nothing chosen: no file
    settings.save(base_model="demo")
    assert "every notebook and command" in path.read_text() and settings.read_file() == {"base_model": "demo"}
    settings.save(base_model=None)
    assert settings.read_file() == {}
    assert not path.with_name(path.name + ".tmp").exists()


def test_a_recorded_model_must_still_be_complete(tmp_path):
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    settings.remember_model("org/model", folder, "mirror", revision="abc")
    s = settings.load()
    assert s.recorded_model("org/model") is None  # no weights: not complete
    (folder / "model.safetensors").write_bytes(b"x")
    assert settings.load().recorded_model("org/model") == folder.resolve()
    assert settings.load().recorded_model("org/model", revision="other") is None
    assert settings.load().recorded_model("org/other") is None


@pytest.mark.parametrize("text, message", [
    ("source: [1,\n", "not valid YAML"),
    ("- a\n- b\n", "key: value pairs"),
    ("sorce: mirror\n", "unknown setting 'sorce'; valid settings are: source"),
    ("source: hf\n", "model source 'hf'"),
    ("models: [a]\n", "'models' must map hub ids"),
])
def test_a_broken_settings_file_is_one_sentence(text, message):
    settings.settings_path().write_text(text)
    with pytest.raises(ConchError, match=message) as info:
        settings.load()
    assert "\n" not in str(info.value)


def test_an_unknown_source_in_the_environment_names_it(monkeypatch):
    monkeypatch.setenv("CONCH_MODEL_SOURCE", "ollama")
    with pytest.raises(ConchError, match=r"'ollama' \(from CONCH_MODEL_SOURCE\) is unknown"):
        settings.load()
