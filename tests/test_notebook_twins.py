"""Each Chinese notebook (notebooks/) and its English twin (notebooks/en/) run the same code: the same
cells, code and saved outputs; only the markdown is in another language (tests/notebook_twins.py)."""

import copy

import pytest

from tests import notebook_twins as twins

PAIRS = twins.pairs()


def test_every_notebook_has_a_twin():
    assert len(PAIRS) == 11
    assert sorted(p.name for p in twins.EN.glob("*.ipynb")) == [zh.name for zh, _ in PAIRS]


@pytest.mark.parametrize("zh, en", PAIRS, ids=[zh.stem for zh, _ in PAIRS])
def test_twins_have_the_same_code_and_outputs_and_only_the_markdown_differs(zh, en):
    chinese, english = twins.read(zh), twins.read(en)
    drift = twins.differences(chinese, english)
    assert not drift, (f"{en.name} has drifted from {zh.name}: {'; '.join(drift)}; "
                       "run `python -m tests.notebook_twins sync`")
    assert twins.cjk_share(chinese) > 0.5, f"notebooks/{zh.name}: its markdown is not Chinese"
    assert twins.cjk_share(english) < 0.05, f"notebooks/en/{en.name}: its markdown is not English"
    # each links the other under its title
    assert f"(en/{zh.name})" in twins.text(chinese["cells"][0]) and f"(../{zh.name})" in twins.text(english["cells"][0])


def test_differences_names_what_drifted():
    cell = {"id": "a", "cell_type": "code", "source": "x = 1", "outputs": [{"text": "1"}]}
    md = {"id": "b", "cell_type": "markdown", "source": "Hello"}
    zh = {"cells": [md | {"source": "你好"}, cell], "metadata": {"conch": {"stamp": 1}}}
    en = {"cells": [md, copy.deepcopy(cell)], "metadata": {"conch": {"stamp": 1}}}
    assert twins.differences(zh, en) == []
    en["cells"][1]["outputs"] = [{"text": "2"}]
    assert twins.differences(zh, en) == ["cell 1 (a): the saved outputs differ"]
    en["cells"][1]["source"] = "x = 2"
    assert twins.differences(zh, en) == ["cell 1 (a): the code differs"]
    en["cells"].pop(0)
    assert "the cells differ" in twins.differences(zh, en)[0]


def test_wrapped_chinese_lines_are_joined_without_a_stray_space():
    text = ("中文句子的前半\n后半，用 2\n核 CPU\n（约 7\ns）。\n- 列表\n  续行\n\n"
            "| 表 |\n| 格 |\n```\n代码\n保留\n```\nEnglish\nwraps")
    assert twins.join_soft_breaks(text) == (
        "中文句子的前半后半，用 2 核 CPU（约 7\ns）。\n- 列表续行\n\n"
        "| 表 |\n| 格 |\n```\n代码\n保留\n```\nEnglish\nwraps")
