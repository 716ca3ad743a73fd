"""`make test` builds .venv-vllm and .venv-lf in the background while the tests run (minutes of pip each, which
only tests/test_serve_vllm.py and tests/test_llamafactory.py need): those tests wait here for their build."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

BUILDS = Path(__file__).resolve().parents[1] / ".cache" / "venv-builds"  # <target>.pid, .log, .rc (the Makefile's)
WAIT_S = 1800


def alive(pid_file: Path) -> bool:
    """Whether the process whose pid starts ``pid_file`` runs (False: gone, empty or torn file)."""
    try:
        os.kill(int(pid_file.read_text(encoding="utf-8").split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def wait_for(target: str) -> None:
    """Return once `make <target>` has finished in the background (at once when none is running); fail with the end
    of its log when it failed."""
    log, rc, pid = (BUILDS / f"{target}{ext}" for ext in (".log", ".rc", ".pid"))
    deadline = time.monotonic() + WAIT_S
    while log.exists() and not rc.exists() and alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"`make {target}` is still running after {WAIT_S} s (its log: {log})")
        time.sleep(2)
    if rc.exists() and rc.read_text().strip() != "0":
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        pytest.fail(f"`make {target}` failed (exit {rc.read_text().strip()}); the end of {log}:\n{tail}")
