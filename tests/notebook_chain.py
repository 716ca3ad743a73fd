"""A pytest plugin (``-p tests.notebook_chain``, `make test`): notebooks that read another's outputs wait for it.

`make test` runs the training notebooks (04 -> 06 -> 10) on one xdist worker and the others after the test modules
on the other (tests/conftest.py groups them). Notebook 05 reads 04's adapter, 07-10 read 06's merged model: the
first cell of such a notebook waits until the one it needs has finished, and fails at once if that one failed. A
plugin rather than a conftest hook, since tests/conftest.py's per-test hooks do not reach ``notebooks/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

TRAINING_CHAIN = ("04", "06", "10")  # notebooks/NN_*.ipynb, in this order, on one worker
NEEDS = {"05": "04", "06": "04", "07": "06", "08": "06", "09": "06", "10": "06"}  # reads that one's outputs
WAIT_S = 3600
DONE = Path(__file__).resolve().parents[1] / ".cache" / "notebooks-done"  # one file a notebook: passed | failed
_last_cells: dict[str, str] = {}  # notebook number -> node id of its last cell in this run
_waited: set[str] = set()


def notebook_number(nodeid: str) -> str | None:
    """"04" for ``notebooks/04_train_lora.ipynb::Cell 3``; None for anything else."""
    return nodeid[len("notebooks/"):][:2] if nodeid.startswith("notebooks/") else None


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers: a fresh record
        shutil.rmtree(DONE, ignore_errors=True)


def pytest_collection_modifyitems(items):
    for item in items:
        number = notebook_number(item.nodeid)
        if number:
            _last_cells[number] = item.nodeid


def pytest_runtest_setup(item):
    number = notebook_number(item.nodeid)
    needed = NEEDS.get(number)
    if not needed or number in _waited or needed not in _last_cells:  # not running in this session: nothing to wait for
        return
    _waited.add(number)
    marker, deadline = DONE / needed, time.monotonic() + WAIT_S
    while not marker.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"notebook {needed} did not finish within {WAIT_S} s, and notebook {number} reads its outputs")
        time.sleep(2)
    if marker.read_text().strip() != "passed":
        pytest.fail(f"notebook {needed} failed, and notebook {number} reads its outputs: fix {needed} first")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    number = notebook_number(item.nodeid)
    if not number or (DONE / number).exists():
        return
    if report.failed or (report.when == "teardown" and item.nodeid == _last_cells.get(number)):
        DONE.mkdir(parents=True, exist_ok=True)
        (DONE / number).write_text("failed" if report.failed else "passed")
