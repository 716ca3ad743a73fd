"""Where things live, and how a finished folder gets there. A leaf module: it imports nothing from conch."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


def remove(path: Path) -> None:
    """Delete a folder, file or link if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


@contextmanager
def staged(target: str | Path, *, overlay: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty folder on target's filesystem; move it into place only if the block ends without error.

    By default the folder is the sibling ``<target>.tmp`` and replaces ``target`` whole: the old
    one is moved aside to ``<target>.old``, the new one renamed in, the old one deleted. With
    ``overlay=True`` (target keeps its other contents, and may be a mount point) the folder is
    ``<target>/.staged.tmp`` and each entry replaces its namesake in ``target``. On an exception
    the folder is deleted and ``target`` is left as it was.
    """
    target = Path(os.path.abspath(target))  # "." and "run/.." have a name too
    tmp = target / ".staged.tmp" if overlay else target.with_name(target.name + ".tmp")
    remove(tmp)  # a leftover of an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    if overlay:
        for item in tmp.iterdir():
            dest = target / item.name
            if dest.is_dir() or item.is_dir():  # a file replaces a file in one step; a folder cannot
                remove(dest)
            item.replace(dest)
        tmp.rmdir()
        return
    old = target.with_name(target.name + ".old")
    remove(old)
    moved_aside = os.path.lexists(target)
    if moved_aside:
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if moved_aside:
            old.rename(target)
        remove(tmp)
        raise
    remove(old)
