import dataclasses
import subprocess
import sys
import typing

import pytest

from conch.__main__ import STAGES, main, normalize, parse
from conch.config import load_config


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "conch", *args], capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_and_exit_2():
    result = run_cli("download", "--model", "/no/such/model/folder")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_chat_answers_one_question(demo_path):
    result = run_cli("chat", "--model", str(demo_path), "--question", "What is the capital of France?",
                     "--temperature", "0", "--max_new_tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


# ---------------------------------------------------------------------------------------------
# one dialect: --max_new_tokens, with --max-new-tokens accepted as an alias everywhere


def test_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0
    for stage in STAGES:
        assert stage.name in result.stdout
    assert [s.name for s in STAGES] == ["run", "download", "settings", "chat", "train", "dpo", "eval", "merge",
                                        "export", "serve"]


def test_a_stage_help_lists_its_options_with_underscores(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--api_key" in out and "--insecure" in out and "--max_tokens_limit" in out and "--api-key" not in out
    assert main(["chat", "-h"]) == 0
    assert "--max_new_tokens" in capsys.readouterr().out


def test_normalize_touches_option_names_only():
    assert normalize(["chat", "--max-new-tokens", "5", "--question", "a-b --c", "--cache-dir=/x-y", "-h", "-5"]) == \
        ["chat", "--max_new_tokens", "5", "--question", "a-b --c", "--cache_dir=/x-y", "-h", "-5"]


def _sample(cls, name, default):
    """A value for field ``name`` (as typed on the command line) that differs from its default where it can."""
    kind = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        kind = args[0]
    if kind is bool:
        return "false" if default else "true"
    if kind is int:
        return "7" if default != 7 else "8"
    if kind is float:
        return "0.25" if default != 0.25 else "0.5"
    if typing.get_origin(kind) is list:
        return {int: "1,2", float: "0.5,1.5"}.get((typing.get_args(kind) or (str,))[0], "a,b")
    return "some/value"


OWN_OPTIONS = [(s.name, o) for s in STAGES for o in s.options]


@pytest.mark.parametrize("stage, option", OWN_OPTIONS, ids=[f"{s}-{o.name}" for s, o in OWN_OPTIONS])
def test_both_spellings_of_each_stage_option(stage, option):
    value = {int: "7", float: "0.25"}.get(option.type, "some/value")
    results = []
    for spelling in (option.name, option.name.replace("_", "-")):
        for argv in ([stage, f"--{spelling}", value], [stage, f"--{spelling}={value}"]):
            _, args, cfg = parse(argv)
            assert cfg is None
            results.append(getattr(args, option.name))
    assert results == [option.type(value)] * 4


CONFIG_FIELDS = [(s, f.name) for s in STAGES if s.config for f in dataclasses.fields(s.config_class())]


@pytest.mark.parametrize("stage, name", CONFIG_FIELDS, ids=[f"{s.name}-{n}" for s, n in CONFIG_FIELDS])
def test_both_spellings_of_each_config_field(stage, name, tmp_path):
    cls = stage.config_class()
    default = getattr(cls(), name)
    value = _sample(cls, name, default)
    empty = tmp_path / "empty.yaml"  # train and dpo read their default YAML otherwise: test the option alone
    empty.write_text("{}\n")
    configs = [parse([stage.name, "--config", str(empty), f"--{spelling}", value])[2]
               for spelling in (name, name.replace("_", "-"))]
    assert configs[0] == configs[1] == load_config(cls, None, [f"{name}={value}"])
    assert getattr(configs[0], name) != default


def test_a_config_stage_reads_its_default_yaml():
    stage, _, cfg = parse(["train", "--learning-rate", "1e-4"])
    assert stage.name == "train" and cfg.learning_rate == 1e-4
    assert cfg.output_dir == load_config(type(cfg), ["configs/magic_conch_lora.yaml"]).output_dir


@pytest.mark.parametrize("stage", [s.name for s in STAGES])
def test_an_unknown_option_is_one_sentence_and_exit_2(stage, capsys):
    assert main([stage, "--no_such_option", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--no_such_option" in err
    assert f"`python -m conch {stage}` has no option" in err


def test_an_unknown_option_from_the_shell(tmp_path):
    result = run_cli("chat", "--max-new-token", "5", "--question", "hi")  # a typo, dashed
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "--max_new_token" in result.stderr and "--max_new_tokens" in result.stderr


@pytest.mark.parametrize("argv, words", [
    (["chat", "--max_new_tokens", "many"], "invalid int value"),
    (["train", "stray"], "takes no argument 'stray'"),
    (["serve", "--port", "eighty"], "'port' must be int"),
])
def test_other_usage_mistakes_are_one_sentence(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err
