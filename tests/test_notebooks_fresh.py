"""The outputs saved in the notebooks come from the code they show (tests/notebook_stamp.py)."""

import json
import re
import socket

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


def test_the_stamp_follows_imports_into_the_serving_subpackage():
    files = {p.relative_to(stamp.ROOT).as_posix() for p in stamp.conch_modules("from conch.serve import create_app")}
    # serve -> .serving.service -> .engine (relative, inside the subpackage) -> ..reasoning (back up)
    assert {"src/conch/serving/__init__.py", "src/conch/serving/service.py", "src/conch/serving/engine.py",
            "src/conch/serving/sampling.py", "src/conch/reasoning.py", "src/conch/chat.py"} <= files
    assert not any(f.startswith("src/conch/serving/") and not (stamp.ROOT / f).exists() for f in files)


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


MACHINE_PATH = re.compile(r"(?<![\w.~<>-])/(?:work|root|home|tmp|Users|mnt|var|opt|data)/[^\s'\"\\]*")


def machine_traces(nb: dict) -> list[str]:
    """Absolute paths and this machine's host name in a notebook's saved outputs, as 'cell N: text'."""
    host = socket.gethostname()
    found = []
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) + json.dumps(out.get("data", {}), ensure_ascii=False)
            text += "".join(out.get("traceback", [])) + str(out.get("evalue", ""))
            found += [f"cell {i}: {m.group(0)[:80]}" for m in MACHINE_PATH.finditer(text)]
            if len(host) > 3 and host in text:
                found.append(f"cell {i}: the host name {host}")
    return found


@pytest.mark.parametrize("path", stamp.notebook_paths(twins=True), ids=lambda p: p.parent.name + "/" + p.stem)
def test_saved_outputs_show_nothing_of_the_machine(path):
    found = machine_traces(json.loads(path.read_text(encoding="utf-8")))
    assert not found, (f"{path.name} shows the machine that ran it ({'; '.join(found[:5])}): print paths through "
                       "conch.paths.shown (relative to the repository) and re-run the notebook")


def test_machine_traces_finds_paths_and_not_urls_or_repo_paths():
    nb = {"cells": [{"outputs": [{"text": ["folder: /work/main/models/x\n", "see https://hf-mirror.com/a/b\n",
                                           "models/smollm2 and ~/autodl-tmp/x and <tmp>/y\n"]}]}]}
    assert machine_traces(nb) == ["cell 0: /work/main/models/x"]
