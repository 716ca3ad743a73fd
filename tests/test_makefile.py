"""Makefile recipes a learner's machine runs and this one cannot reproduce: run with stand-ins (fast)."""

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs GNU make")


def make(*args, path_first: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path_first:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    return subprocess.run([MAKE, "-s", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)


def fake_jupyter_server(tmp_path: Path, pip_exit: int) -> tuple[Path, Path]:
    """An image's own JupyterLab as AutoDL has it: bin/jupyter-lab whose shebang names that image's Python (here a
    script that records how it was called and exits with ``pip_exit``)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    python = tmp_path / "image-python"
    python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit {pip_exit}\n')
    python.chmod(0o755)
    server = bin_dir / "jupyter-lab"
    server.write_text(f"#!{python}\n")
    server.chmod(0o755)
    return bin_dir, calls


def test_widgets_go_into_the_python_that_runs_the_jupyterlab_server(tmp_path):
    bin_dir, calls = fake_jupyter_server(tmp_path, pip_exit=0)
    done = make("widgets", path_first=bin_dir)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["-m", "pip", "install", "-q", "jupyterlab_widgets>=3"]
    assert "widgets: installed into" in done.stdout and "refresh the page" in done.stdout


def test_widgets_that_cannot_install_say_what_the_learner_sees(tmp_path):
    bin_dir, calls = fake_jupyter_server(tmp_path, pip_exit=1)
    done = make("widgets", path_first=bin_dir)
    assert done.returncode == 0  # the rest of `make setup` goes on
    assert "could not install jupyterlab_widgets" in done.stdout and "show as text" in done.stdout


def test_widgets_leave_the_venvs_own_jupyterlab_alone(tmp_path):
    """`make lab` runs .venv's JupyterLab, which has the widgets from requirements.txt: nothing to install."""
    bin_dir = REPO / ".venv" / "bin"
    if not (bin_dir / "jupyter-lab").exists():
        pytest.skip(".venv has no jupyter-lab yet (make setup)")
    done = make("widgets", path_first=bin_dir)
    assert done.returncode == 0 and done.stdout == ""


def test_fast_malloc_preloads_tcmalloc_where_it_is_installed():
    if not glob.glob("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4"):
        pytest.skip("libtcmalloc-minimal4 is not installed (make system-deps installs it, as root)")
    show = "show-malloc: ; @$(FAST_MALLOC) python3 -c 'print(open(\"/proc/self/maps\").read())'"
    done = make("--eval", show, "show-malloc")
    assert done.returncode == 0, done.stderr
    assert "libtcmalloc_minimal.so.4" in done.stdout


def test_python_keeps_its_bytecode_under_make_even_where_the_environment_says_not_to(monkeypatch):
    # pip installs with --no-compile (NO_PYC): without this every process would compile torch's modules again
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    show = "show-pyc: ; @python3 -c 'import sys; print(sys.dont_write_bytecode)'"
    done = make("--eval", show, "show-pyc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
