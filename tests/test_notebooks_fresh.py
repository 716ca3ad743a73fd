"""The outputs saved in the notebooks come from the code they show (tests/notebook_stamp.py)."""

import json

import pytest

from tests import notebook_stamp as stamp

NOTEBOOKS = stamp.notebook_paths()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_outputs_come_from_current_code(path):
    reasons = stamp.stale_reasons(path)
    assert not reasons, (
        f"{path.name}'s saved outputs are older than the code it shows ({', '.join(reasons)} changed): "
        f"run `make notebooks NB={path.name[:2]}` and commit the notebook"
    )


def test_the_stamp_follows_conch_imports():
    code = "import numpy as np\nfrom conch import train\n%matplotlib inline\n!ls\n"
    files = {p.name for p in stamp.conch_modules(code)}
    assert "train.py" in files and "errors.py" in files  # train imports .errors
    assert "serve.py" not in files


def test_a_changed_cell_or_module_makes_a_notebook_stale(tmp_path, monkeypatch):
    nb = {"cells": [{"cell_type": "code", "source": "from conch import lowrank\nx = 1"}], "metadata": {}}
    nb["metadata"]["conch"] = {"stamp": stamp.fingerprint(nb)}
    path = tmp_path / "99_x.ipynb"
    path.write_text(json.dumps(nb))
    assert stamp.stale_reasons(path) == []

    nb["cells"][0]["source"] += "\ny = 2"
    path.write_text(json.dumps(nb))
    assert stamp.stale_reasons(path) == [stamp.CELLS]

    nb["cells"][0]["source"] = "from conch import lowrank\nx = 1"
    nb["metadata"]["conch"]["stamp"]["src/conch/lowrank.py"] = "0" * 16
    path.write_text(json.dumps(nb))
    assert stamp.stale_reasons(path) == ["src/conch/lowrank.py"]
