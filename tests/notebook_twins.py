"""The Chinese notebooks (notebooks/NN_*.ipynb) and their English twins (notebooks/en/NN_*.ipynb).

A pair has the same cells, in the same order and with the same ids; the code cells, their saved
outputs and the notebook's stamp are the same, only the markdown differs. Only the Chinese set is
executed (by nbval in `make test` and by `make notebooks`): `sync` copies what the code made into
the English twins, and tests/test_notebook_twins.py fails when a pair has drifted apart.

    python -m tests.notebook_twins sync            # after editing or running a Chinese notebook
    python -m tests.notebook_twins export 04 f.md  # the English markdown cells, one block per cell id
    python -m tests.notebook_twins verify 04 f.md  # a translation keeps every cell, code span, number and link
    python -m tests.notebook_twins import 04 f.md  # write translated blocks into the Chinese notebook
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZH = ROOT / "notebooks"
EN = ZH / "en"
BLOCK = re.compile(r"^<!-- cell (\S+) -->\n", re.M)


def pairs() -> list[tuple[Path, Path]]:
    return [(zh, EN / zh.name) for zh in sorted(ZH.glob("[0-9][0-9]_*.ipynb"))]


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write(path: Path, nb: dict) -> None:
    tmp = path.with_suffix(".ipynb.tmp")
    tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def cjk_share_of(md: str) -> float:
    """The share of CJK characters among the letters of markdown prose (code spans and links left out)."""
    md = re.sub(r"```.*?```|`[^`]*`|\]\([^)]*\)|https?://\S+", "", md, flags=re.S)  # code and links stay English
    cjk = len(re.findall(r"[\u4e00-\u9fff]", md))
    latin = len(re.findall(r"[A-Za-z]", md))
    return cjk / max(cjk + latin, 1)


def cjk_share(nb: dict) -> float:
    return cjk_share_of("".join(text(c) for c in nb["cells"] if c["cell_type"] == "markdown"))


def differences(zh: dict, en: dict) -> list[str]:
    """How an English twin differs from its Chinese notebook beyond the markdown; empty when none."""
    found = []
    shape_zh = [(c.get("id"), c["cell_type"]) for c in zh["cells"]]
    shape_en = [(c.get("id"), c["cell_type"]) for c in en["cells"]]
    if shape_zh != shape_en:
        return [f"the cells differ (ids and types: {len(shape_zh)} cells against {len(shape_en)})"]
    for i, (a, b) in enumerate(zip(zh["cells"], en["cells"])):
        if a["cell_type"] != "code":
            continue
        if text(a) != text(b):
            found.append(f"cell {i} ({a.get('id')}): the code differs")
        elif a.get("outputs") != b.get("outputs"):
            found.append(f"cell {i} ({a.get('id')}): the saved outputs differ")
    if zh["metadata"].get("conch") != en["metadata"].get("conch"):
        found.append("the stamp differs (the outputs come from another run)")
    return found


def sync_one(zh_path: Path, en_path: Path) -> bool:
    """Copy the code cells, their outputs and the stamp from the Chinese notebook to its twin."""
    zh, en = read(zh_path), read(en_path)
    english = {c.get("id"): c for c in en["cells"] if c["cell_type"] == "markdown"}
    missing = [c.get("id") for c in zh["cells"] if c["cell_type"] == "markdown" and c.get("id") not in english]
    if missing:
        raise SystemExit(
            f"{en_path.relative_to(ROOT)} has no English for the markdown cell(s) {', '.join(map(str, missing))} "
            f"of {zh_path.relative_to(ROOT)}: add them to the twin (same cell id), then run sync again"
        )
    cells = []
    for cell in zh["cells"]:
        if cell["cell_type"] == "markdown":
            twin = copy.deepcopy(english[cell.get("id")])
            twin["metadata"] = copy.deepcopy(cell.get("metadata", {}))
            cells.append(twin)
        else:
            cells.append(copy.deepcopy(cell))
    new = copy.deepcopy(zh)
    new["cells"] = cells
    if new == en:
        return False
    write(en_path, new)
    return True


def sync() -> None:
    EN.mkdir(exist_ok=True)
    for zh_path, en_path in pairs():
        if not en_path.exists():
            raise SystemExit(f"{zh_path.name} has no English twin: create {en_path.relative_to(ROOT)}")
        if sync_one(zh_path, en_path):
            print(f"{en_path.relative_to(ROOT)}: updated from {zh_path.relative_to(ROOT)}")


def export(nn: str, out: Path) -> None:
    nb = read(find(EN, nn))
    blocks = [f"<!-- cell {c['id']} -->\n{text(c).rstrip()}\n" for c in nb["cells"] if c["cell_type"] == "markdown"]
    out.write_text("\n".join(blocks), encoding="utf-8")


def blocks_of(src: Path) -> dict[str, str]:
    parts = BLOCK.split(src.read_text(encoding="utf-8"))
    return {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts), 2)}


KEPT = re.compile(r"`[^`]+`|\]\([^)\s]+\)|https?://[^\s)>\]]+|(?<![\w.])\d+(?:[.,]\d+)*")


def verify(nn: str, src: Path) -> int:
    """What a translation lost: cells, `code spans`, link targets, URLs and numbers of the English."""
    english = {c["id"]: text(c) for c in read(find(EN, nn))["cells"] if c["cell_type"] == "markdown"}
    chinese = blocks_of(src)
    problems = []
    if list(chinese) != list(english):
        problems.append(f"the cell markers differ from the English ones (order or ids): "
                        f"missing {sorted(set(english) - set(chinese))}, unknown {sorted(set(chinese) - set(english))}")
    for cell_id, body in english.items():
        zh = chinese.get(cell_id, "")
        flat = " ".join(zh.split())  # a code span may be wrapped at another place in the translation
        prose = re.sub(r"```.*?```", "", body, flags=re.S)  # fenced blocks: their comments may be translated
        lost = [k for k in dict.fromkeys(KEPT.findall(prose)) if " ".join(k.split()) not in flat]
        if lost:
            problems.append(f"cell {cell_id}: not found in the translation: {lost}")
    print("\n".join(problems) or "every cell, code span, link, URL and number is kept")
    print(f"CJK share of the prose's letters: {cjk_share_of(''.join(chinese.values())):.0%}")
    return 1 if problems else 0


CJK = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")
PUNCT = re.compile(r"[\u3000-\u303f\uff00-\uffef]")
BLOCK_START = re.compile(r"\s*([-*+>|#]|\d+[.)]\s|```|\$\$|<)")


def join_soft_breaks(markdown: str) -> str:
    """Join a paragraph's wrapped lines where either side is Chinese: the browser shows a line break
    inside a paragraph as a space, which does not belong between two Chinese characters."""
    out: list[str] = []
    fenced = False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append(line)
            continue
        prev = out[-1] if out else ""
        continuation = (not fenced and prev.strip() and line.strip() and not BLOCK_START.match(line)
                        and not prev.lstrip().startswith(("|", "#", "```", "$$", "<"))
                        and not prev.endswith(("  ", "\\")))
        left, right = prev.rstrip()[-1:], line.strip()[:1]
        if continuation and (CJK.match(left) or CJK.match(right)):
            # between two Chinese characters, or next to Chinese punctuation, nothing; else one space
            tight = (CJK.match(left) and CJK.match(right)) or PUNCT.match(left) or PUNCT.match(right)
            out[-1] = prev.rstrip() + ("" if tight else " ") + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def import_(nn: str, src: Path) -> None:
    path = find(ZH, nn)
    nb = read(path)
    blocks = blocks_of(src)
    markdown = {c["id"]: c for c in nb["cells"] if c["cell_type"] == "markdown"}
    unknown = sorted(set(blocks) - set(markdown))
    absent = sorted(set(markdown) - set(blocks))
    if unknown or absent:
        raise SystemExit(f"{src}: cell ids not in {path.name}: {unknown}; markdown cells without a block: {absent}")
    for cell_id, body in blocks.items():
        lines = join_soft_breaks(body).splitlines(keepends=True)
        markdown[cell_id]["source"] = lines
    write(path, nb)


def find(folder: Path, nn: str) -> Path:
    match = sorted(folder.glob(f"{nn}_*.ipynb"))
    if len(match) != 1:
        raise SystemExit(f"no single notebook {nn}_*.ipynb in {folder.relative_to(ROOT)}")
    return match[0]


def main(argv: list[str]) -> int:
    if argv[:1] == ["sync"]:
        sync()
        return 0
    if len(argv) == 3 and argv[0] == "verify":
        return verify(argv[1], Path(argv[2]))
    if len(argv) == 3 and argv[0] in ("export", "import"):
        (export if argv[0] == "export" else import_)(argv[1], Path(argv[2]))
        return 0
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
