"""tests/lanes.py: the test modules wait while a notebook cell trains (make test's two workers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import lanes

ROOT = Path(__file__).resolve().parents[1]


def test_the_training_cells_are_04s_two_runs_and_10s_dpo():
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = [c for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        found += [f"{path.name}::Cell {i}" for i, c in enumerate(code) if lanes.trains("".join(c["source"]))]
    assert found == ["04_train_lora.ipynb::Cell 10", "04_train_lora.ipynb::Cell 18", "10_dpo.ipynb::Cell 4"]


@pytest.mark.parametrize("source, expected", [
    ("result = train.fit(trainer, cfg, resolved)", True),
    ("x = 1\nkeep = train.train(keep_cfg)", True),
    ("result = dpo.dpo(cfg)", True),
    ("# result = train.train(cfg)  (what make run does)", False),
    ("print('train.train(cfg) is what make run calls')", True),  # a string is not parsed: it waits, harmlessly
    ("trainer = train.build_trainer(cfg)", False),
    ("report = evaluate.evaluate(cfg, model, tokenizer)", False),
])
def test_which_sources_train(source, expected):
    assert lanes.trains(source) is expected


def test_the_marker_lives_as_long_as_the_cell(tmp_path):
    marker = tmp_path / "lanes" / "training"
    with pytest.raises(RuntimeError):
        with lanes.training("notebooks/04.ipynb::Cell 10", marker):
            assert marker.read_text() == f"{os.getpid()} notebooks/04.ipynb::Cell 10\n"
            raise RuntimeError("the cell failed")
    assert not marker.exists()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_test_waits_until_the_training_ends(tmp_path):
    marker, waited, clock = tmp_path / "training", tmp_path / "waited.log", Clock()
    marker.write_text(f"{os.getpid()} notebooks/10_dpo.ipynb::Cell 4\n")

    def sleep(seconds):
        clock.now += seconds
        if clock.now >= 30:
            marker.unlink()

    assert lanes.wait_while_training("tests/test_serve.py::test_x", marker, waited, clock=clock, sleep=sleep) == 30
    assert waited.read_text() == "30.0 tests/test_serve.py::test_x\n"
    assert lanes.wait_while_training("tests/test_serve.py::test_y", marker, waited, clock=clock, sleep=sleep) == 0
    assert waited.read_text().count("\n") == 1  # no wait, no line
    assert lanes.summary(waited) == ("the test modules waited 0.5 min in 1 pauses while notebook cells trained "
                                     "(both cores to the training; tests/lanes.py)")


def test_no_wait_for_a_dead_worker_a_torn_marker_or_past_the_limit(tmp_path):
    marker, waited, clock = tmp_path / "training", tmp_path / "waited.log", Clock()

    def sleep(seconds):
        clock.now += seconds

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for text in (f"{gone.stdout.strip()} notebooks/04.ipynb::Cell 10\n", "", "not-a-pid\n"):
        marker.write_text(text)
        assert lanes.wait_while_training("t", marker, waited, clock=clock, sleep=sleep) == 0
    marker.write_text(f"{os.getpid()} notebooks/04.ipynb::Cell 10\n")  # alive, and never ends
    assert lanes.wait_while_training("t", marker, waited, max_s=120, clock=clock, sleep=sleep) == 120
    assert lanes.summary(tmp_path / "none.log") is None
