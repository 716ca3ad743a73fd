import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from conch.config import load_config, parse_cli_overrides, read_yaml_mapping
from conch.errors import ConchError


@dataclass
class Cfg:
    learning_rate: float = 2e-4
    epochs: int = 3
    bf16: bool = False
    name: str = "x"
    targets: list[str] = field(default_factory=lambda: ["q_proj"])
    limit: int | None = None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nepochs: 5\ntargets: [q_proj, v_proj]\n")
    cfg = load_config(Cfg, path, ["epochs=7", "bf16=true", "limit=none"])
    assert cfg == Cfg(learning_rate=1e-4, epochs=7, bf16=True, targets=["q_proj", "v_proj"], limit=None)


def test_cli_style_overrides():
    assert parse_cli_overrides(["--epochs", "2", "--bf16", "--name=y"]) == ["epochs=2", "bf16=true", "name=y"]
    cfg = load_config(Cfg, None, ["learning-rate=3e-4", "targets=q_proj,k_proj"])
    assert cfg.learning_rate == 3e-4 and cfg.targets == ["q_proj", "k_proj"]


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1\n")
    with pytest.raises(ConchError, match=r"unknown setting 'learning_rat'.*learning_rate"):
        load_config(Cfg, path)


@pytest.mark.parametrize("override", ["epochs=two", "epochs=1.5", "bf16=maybe"])
def test_wrong_type_is_one_sentence(override):
    with pytest.raises(ConchError, match="must be"):
        load_config(Cfg, None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConchError, match="does not exist"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConchError, match="not valid YAML"):
        load_config(Cfg, bad)


@pytest.mark.parametrize("text, message", [
    ("a: 1\nb: [1,\n", r"bad.yaml is not valid YAML at line 3 \(.*\); fix that line\.$"),
    ("- a\n- b\n", r"bad.yaml must hold key: value pairs at its top level, not a list; fix it\.$"),
    ("just text\n", r"not a single value; fix it\.$"),
])
def test_read_yaml_mapping_is_one_sentence_naming_the_file_and_line(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConchError, match=message) as info:
        read_yaml_mapping(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ConchError, match="or delete the file"):
        read_yaml_mapping(bad, deletable=True)


def test_read_yaml_mapping_reads_a_mapping_and_an_empty_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\nb: [x, y]\n")
    assert read_yaml_mapping(path) == {"a": 1, "b": ["x", "y"]}
    path.write_text("# nothing yet\n")
    assert read_yaml_mapping(path) == {}
    with pytest.raises(ConchError, match="does not exist"):
        read_yaml_mapping(tmp_path / "nope.yaml")


def test_later_files_override_earlier_ones(tmp_path):
    base, overlay = tmp_path / "base.yaml", tmp_path / "cpu.yaml"
    base.write_text("epochs: 5\nname: gpu\n")
    overlay.write_text("name: cpu\n")
    assert load_config(Cfg, [base, overlay]) == Cfg(epochs=5, name="cpu")


def test_dict_overrides_keep_lists_and_none():
    cfg = load_config(Cfg, None, {"targets": ["q_proj", "k_proj"], "limit": None, "epochs": 4, "bf16": True})
    assert cfg.targets == ["q_proj", "k_proj"] and cfg.limit is None and cfg.epochs == 4 and cfg.bf16 is True
    assert load_config(Cfg, None, {"targets": "q_proj,v_proj"}).targets == ["q_proj", "v_proj"]


def test_a_list_for_a_single_value_is_one_sentence():
    with pytest.raises(ConchError, match=r"'name' must be str, got \['a', 'b'\]"):
        load_config(Cfg, None, {"name": ["a", "b"]})


def test_pyproject_declares_what_requirements_txt_lists():
    """`pip install -e .` alone installs the learner's packages: pyproject's dependencies are requirements.txt's."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib", reason="tomllib comes with Python 3.11")

    root = Path(__file__).resolve().parents[1]
    listed = [line.split("#")[0].strip() for line in (root / "requirements.txt").read_text().splitlines()]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    assert declared == [line for line in listed if line]


def test_constraints_pin_every_requirement_but_torch():
    """constraints.txt (the versions the notebooks ran with) covers requirements.txt, torch aside."""
    from conch import settings

    def names(path):
        return {re.split(r"[<>=!~ ;\[]", line.split("#")[0].strip())[0].lower().replace("_", "-")
                for line in open(path, encoding="utf-8") if line.split("#")[0].strip()}

    assert names("constraints.txt") == names("requirements.txt") - {"torch"}
    table = settings.versions()
    assert "transformers" in table and "notebooks ran with" in table


def test_a_config_shows_its_own_fields_before_the_shared_ones():
    from conch.config import as_ordered_dict, field_names
    from conch.dpo import DpoConfig
    from conch.train import TrainConfig
    from conch.trainkit import SharedConfig

    shared = field_names(SharedConfig)
    for cls in (TrainConfig, DpoConfig):
        names = field_names(cls)
        assert names[0] == "base_model" and names[-len(shared):] == shared
        assert sorted(names) == sorted(f.name for f in dataclasses.fields(cls))
        assert list(as_ordered_dict(cls())) == names
