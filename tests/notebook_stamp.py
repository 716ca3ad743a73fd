"""Saved notebook outputs must come from the current code: `make notebooks` and its check.

`make notebooks` (python -m tests.notebook_stamp run [NN ...]) executes notebooks in order, saves
their outputs in place and stamps each one's metadata with the sha256 of what produced them:
its own code cells and every `conch` module they import, followed through the package's own
imports. tests/test_notebooks_fresh.py recomputes the stamp and fails, naming the changed
files, when a notebook's saved outputs are older than that code. Data and config files are not
part of the stamp (a changed record does not make every notebook stale).

By default `run` executes only the stale notebooks; `run all` (make notebooks NB=all) every one.
Only the Chinese notebooks (notebooks/) run; their English twins (notebooks/en/) receive the same
code cells and outputs afterwards (tests/notebook_twins.py).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from tests import notebook_twins as twins

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PACKAGE = ROOT / "src" / "conch"
KERNELSPEC = {"display_name": "Python (conch)", "language": "python", "name": "conch"}
CELLS = "code cells"


def notebook_paths(twins: bool = False) -> list[Path]:
    """The Chinese notebooks (those that run); with ``twins``, their English twins in ``en/`` too."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    return found + sorted((NOTEBOOKS / "en").glob("[0-9][0-9]_*.ipynb")) if twins else found


def code_of(nb: dict) -> str:
    return "\n# ---- cell ----\n".join(
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        for c in nb["cells"]
        if c["cell_type"] == "code"
    )


def _python_only(code: str) -> str:
    """Drop IPython magics and shell lines so that ast can parse a notebook's code."""
    keep = []
    for line in code.splitlines():
        stripped = line.lstrip()
        keep.append("" if stripped.startswith(("%", "!")) else line)
    return "\n".join(keep)


def _module_file(name: str) -> Path | None:
    """src/conch/<a>/<b>.py for 'conch.<a>.<b>', or a package's __init__.py ('conch', 'conch.serving'), else None."""
    parts = name.split(".")
    if parts[0] != "conch":
        return None
    path = PACKAGE.joinpath(*parts[1:])
    if len(parts) > 1 and path.with_suffix(".py").exists():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").exists() else None


def _package_of(name: str) -> str:
    """The package a module's relative imports start from: itself for a package, else its parent."""
    return name if _module_file(name).name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(tree: ast.AST, package: str | None) -> set[str]:
    """Every conch module a syntax tree imports (inside functions too); ``package``: where relative imports start
    (None for a notebook's code). Importing conch.serving.engine runs conch/serving/__init__.py too: parent
    subpackages count (the root's __init__ only where imported by name, as before)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "conch")
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - (node.level - 1)]) + (f".{node.module}" if node.module else "")
            elif node.module and node.module.split(".")[0] == "conch":
                base = node.module
            else:
                continue
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # from conch import train
    found |= {m.rsplit(".", k)[0] for m in found for k in range(1, m.count("."))}  # conch.serving for conch.serving.x
    return {m for m in found if _module_file(m) is not None}


def conch_modules(code: str) -> list[Path]:
    """The conch source files a notebook's code runs, following the package's own imports."""
    todo = _imports(ast.parse(_python_only(code)), package=None)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        todo |= _imports(ast.parse(path.read_text(encoding="utf-8")), package=_package_of(name)) - seen
    return sorted({_module_file(m) for m in seen})


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def fingerprint(nb: dict) -> dict[str, str]:
    """{"code cells": hash, "src/conch/x.py": hash, ...}: what this notebook's outputs depend on."""
    code = code_of(nb)
    prints = {CELLS: _sha(code)}
    for path in conch_modules(code):
        prints[path.relative_to(ROOT).as_posix()] = _sha(path.read_text(encoding="utf-8"))
    return prints


def stale_reasons(path: Path) -> list[str]:
    """What changed since the notebook's outputs were saved; empty when they are current."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    saved = nb.get("metadata", {}).get("conch", {}).get("stamp")
    if not saved:
        return ["it was never run by `make notebooks`"]
    now = fingerprint(nb)
    changed = [k for k in now if saved.get(k) != now[k]]
    changed += [f"{k} (no longer used)" for k in saved if k not in now]
    return changed


def run_one(path: Path) -> float:
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    raw = json.loads(path.read_text(encoding="utf-8"))
    for cell in raw["cells"]:  # cells added by a script may lack the id nbformat 5 wants
        cell.setdefault("id", uuid.uuid4().hex[:8])
    raw["nbformat_minor"] = max(raw.get("nbformat_minor", 0), 5)
    nb = nbformat.reads(json.dumps(raw), as_version=4)
    # the venv's own python3 kernel: this works on a machine where `make kernel` never ran
    ep = ExecutePreprocessor(timeout=3600, kernel_name="python3")
    start = time.time()
    ep.preprocess(nb, {"metadata": {"path": str(NOTEBOOKS)}})
    seconds = time.time() - start
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata.setdefault("conch", {})["stamp"] = fingerprint(json.loads(nbformat.writes(nb)))
    twins.write(path, json.loads(nbformat.writes(nb)))  # a notebook that failed half-way is never written
    return seconds


def select(args: list[str]) -> list[Path]:
    paths = notebook_paths()
    if args == ["all"]:
        return paths
    if not args:
        return [p for p in paths if stale_reasons(p)]
    chosen = []
    for arg in args:
        match = [p for p in paths if p.name.startswith(arg)]
        if not match:
            sys.exit(f"no notebook starts with {arg!r}: give a number such as 04, or 'all'")
        chosen += match
    return chosen


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "check"):
        print("usage: python -m tests.notebook_stamp run [all | NN ...]  |  check", file=sys.stderr)
        return 2
    if argv[0] == "check":
        bad = {p.name: r for p in notebook_paths() if (r := stale_reasons(p))}
        for name, reasons in bad.items():
            print(f"{name}: stale ({', '.join(reasons)})")
        return 1 if bad else 0
    os.environ.setdefault("TQDM_DISABLE", "1")  # saved outputs: no progress-bar widgets
    todo = select(argv[1:])
    if not todo:
        print("every notebook's saved outputs come from the current code")
    for path in todo:
        print(f"{path.name}: running ...", flush=True)
        seconds = run_one(path)
        print(f"{path.name}: saved, {seconds:.0f} s", flush=True)
    twins.sync()  # the English twins (notebooks/en/) get the same code cells and outputs
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
