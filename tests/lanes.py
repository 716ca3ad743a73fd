"""`make test`'s two xdist workers share the 2 cores: the notebooks in order on one, the test modules on the other.
While a notebook cell trains (04's LoRA runs, 10's DPO), the test modules wait between two tests, so that the
training has both cores: its thread check (`conch.device.CoreWatch`) takes the second one back within a minute.
Their work moves to the notebooks' lighter cells (kernel starts, plots, servers, short generations), which leave a
core idle much of the time. Measured on the 2-core CI machine: one LoRA step of the demo model took 5.1 s on 2
threads alone, 9.6 s on 1 thread beside a busy process, 15.8 s on 2 threads beside it (docs/benchmarks.md).
A waiting test has not started yet: its own timeout and its servers' deadlines are untouched."""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import venv_builds

LANES = Path(__file__).resolve().parents[1] / ".cache" / "lanes"
MARKER = LANES / "notebook-training"  # the notebook worker's pid and the cell, while a training cell runs
WAITED = LANES / "waited.log"  # one line a wait: seconds, and the test that waited
TRAINING_CELL = re.compile(r"^[^#\n]*\b(train\.fit|train\.train|dpo\.dpo)\(", re.MULTILINE)
MAX_WAIT_S = 3600  # a notebook cell's own limit (tests/conftest.py)


def trains(source: str) -> bool:
    """Whether a notebook cell runs a training (a call of conch's train.fit / train.train / dpo.dpo)."""
    return bool(TRAINING_CELL.search(source))


@contextmanager
def training(label: str, marker: Path = MARKER):
    """The notebook worker, around a cell that trains."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()} {label}\n", encoding="utf-8")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def wait_while_training(who: str, marker: Path = MARKER, waited: Path = WAITED, max_s: float = MAX_WAIT_S,
                        poll_s: float = 1.0, clock=time.monotonic, sleep=time.sleep) -> float:
    """The test-module worker, before a test: return once no notebook cell trains (at most ``max_s``); the seconds
    waited, also appended to ``waited`` for the run's summary."""
    start = clock()
    while marker.exists() and venv_builds.alive(marker) and clock() - start < max_s:
        sleep(poll_s)
    seconds = clock() - start
    if seconds >= poll_s:
        waited.parent.mkdir(parents=True, exist_ok=True)
        with open(waited, "a", encoding="utf-8") as log:
            log.write(f"{seconds:.1f} {who}\n")
    return seconds


def summary(waited: Path = WAITED) -> str | None:
    """One line for the end of the run: how long the test modules waited for the notebooks' training."""
    try:
        rows = [line.split(" ", 1) for line in waited.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return None
    if not rows:
        return None
    total = sum(float(seconds) for seconds, _ in rows)
    return (f"the test modules waited {total / 60:.1f} min in {len(rows)} pauses while notebook cells trained "
            f"(both cores to the training; tests/lanes.py)")


class Lanes:
    """The hooks, registered by tests/conftest.py; they act under xdist only (`make test`, `make check`)."""

    @staticmethod
    def worker() -> bool:
        return bool(os.environ.get("PYTEST_XDIST_WORKER"))

    def pytest_sessionstart(self, session):
        if not self.worker():  # the controller: no marker or wait left from an earlier run
            for stale in (MARKER, WAITED):
                stale.unlink(missing_ok=True)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outside pytest-timeout's clock: the test has not started
    def pytest_runtest_protocol(self, item):
        if self.worker() and not item.nodeid.startswith("notebooks/"):
            wait_while_training(item.nodeid)
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        cell = getattr(item, "cell", None)  # nbval's notebook cell
        if self.worker() and cell is not None and trains(cell.source):
            with training(item.nodeid):
                yield
        else:
            yield

    def pytest_terminal_summary(self, terminalreporter):
        line = None if self.worker() else summary()
        if line:
            terminalreporter.write_line(line)
