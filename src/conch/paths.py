"""Where things live: the checkout and the models folder. A leaf module: it imports nothing from conch."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout this package runs from (``src/conch`` layout), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def models_dir() -> Path:
    """Where converted models live: ``$CONCH_MODELS_DIR`` or ``<repo>/models`` (git-ignored)."""
    return Path(os.environ.get("CONCH_MODELS_DIR") or repo_root() / "models")


def shown(path: str | os.PathLike) -> str:
    """A path as a person types it here: relative to the working directory when it lies under it, ``~/…`` under
    the home folder, else absolute. Printed paths (and saved notebook outputs) then show nothing of the machine."""
    full = Path(os.path.abspath(path))
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            relative = full.relative_to(base)
        except ValueError:
            continue
        return prefix + relative.as_posix() if str(relative) != "." else (prefix.rstrip("/") or ".")
    return str(full)
