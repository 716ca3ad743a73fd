"""README_zh.md is README.md in Chinese: the same commands, word for word (only the comments are translated),
the troubleshooting table in both, and each links to the other and to the glossary."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(path):
    """Every line of the ```bash and ```python blocks, without its comment."""
    text = (ROOT / path).read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```(?:bash|python)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            code = re.split(r"\s+#|^#", line)[0].rstrip()
            if code:
                lines.append(code)
    return lines


def test_the_chinese_readme_has_the_same_commands():
    assert commands("README_zh.md") == commands("README.md")


def test_both_readmes_link_each_other_and_the_glossary_and_have_a_troubleshooting_table():
    en = (ROOT / "README.md").read_text(encoding="utf-8")
    zh = (ROOT / "README_zh.md").read_text(encoding="utf-8")
    assert "(README_zh.md)" in en and "(README.md)" in zh
    assert "(docs/glossary.md)" in en and "(docs/glossary.md)" in zh
    assert (ROOT / "docs" / "glossary.md").is_file()
    assert "## Troubleshooting" in en and "## 常见问题" in zh
    # the same symptoms (the English error messages a learner sees in the logs) in both tables
    def symptoms(text, heading):
        table = text.split(heading, 1)[1]
        return re.findall(r"^\| `([^`]+)`", table, re.M)
    assert symptoms(zh, "## 常见问题") == symptoms(en, "## Troubleshooting")
