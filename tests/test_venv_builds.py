import subprocess
import time

import pytest

from tests import venv_builds


def test_waits_for_a_background_build_and_reports_its_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(venv_builds, "BUILDS", tmp_path)
    venv_builds.wait_for("vllm")  # nothing building: returns at once
    (tmp_path / "x.log").write_text("building")
    job = subprocess.Popen(["bash", "-c", f"echo $$ > {tmp_path}/x.pid; sleep 1; echo 'pip: no' >> {tmp_path}/x.log; "
                                          f"echo 2 > {tmp_path}/x.rc"])
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="exit 2"):
        venv_builds.wait_for("x")
    assert time.monotonic() - started > 0.4
    job.wait()
    (tmp_path / "y.log").write_text("building")
    (tmp_path / "y.pid").write_text("999999")
    venv_builds.wait_for("y")  # its process is gone (an interrupted make test): no waiting
