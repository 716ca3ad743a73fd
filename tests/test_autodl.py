"""An AutoDL instance, played on this machine: a data disk with the clone on it, an empty home.

Notebook 02's download step runs in this process (hub's real code, a stand-in for the hub's
``snapshot_download``, since no hub is reachable here); then training and chat run as the
learner's later notebooks and commands do: fresh processes with a clean environment. They must
find the downloaded model through the settings file, download nothing, and leave the cache on
the data disk.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conch import hub, settings

REPO = Path(__file__).resolve().parents[1]

# a later process: any download attempt ends it with this message
REFUSE_DOWNLOADS = """
import sys, huggingface_hub
def refuse(repo_id, **kw):
    sys.exit(f"download attempted: {repo_id}")
huggingface_hub.snapshot_download = refuse
from conch.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_from_download_to_training_and_chat_on_an_autodl_instance(tmp_path, fake_snapshot_download, monkeypatch):
    import huggingface_hub

    disk, home = tmp_path / "autodl-tmp", tmp_path / "root"
    clone = disk / "conch"  # the README: clone into the data disk
    for part in ("src", "configs", "data"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", clone)
    home.mkdir()

    # notebook 02, in one kernel: BASE_MODEL = the hub id, SOURCE = "auto"
    monkeypatch.setenv("CONCH_DATA_DISK", str(disk))
    monkeypatch.setenv("CONCH_SETTINGS", str(clone / settings.FILENAME))  # the clone's own settings file
    for name in ("HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    calls = fake_snapshot_download.calls
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolved = hub.fetch(hub.TARGET_MODEL, source="auto")
    assert [(c["repo_id"], c["cache_dir"], c["endpoint"]) for c in calls] == [
        (hub.TARGET_MODEL, str(disk / "model-cache"), "https://hf-mirror.com")]
    assert resolved.path.is_relative_to(disk / "model-cache")

    # notebooks 03-10 and the CLI: fresh processes, a clean environment, run from the clone
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CONCH_DATA_DISK": str(disk),
           "PYTHONPATH": str(clone / "src"), "OMP_NUM_THREADS": "1", "CONCH_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    def stage(*args):
        done = subprocess.run([sys.executable, "-c", REFUSE_DOWNLOADS, *args], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "download attempted" not in done.stderr
        return done.stdout

    trained = stage("train", "--config", "configs/magic_conch_lora.yaml", "--max_steps", "2",
                    "--per_device_train_batch_size", "4", "--eval_steps", "100", "--save_steps", "100",
                    "--plot", "off")
    assert f"found at {resolved.path}" in trained  # says where it found the model
    adapter = json.loads((clone / "outputs/magic_conch_lora/adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == resolved.path

    chatted = stage("chat", "--adapter", "outputs/magic_conch_lora", "--question", "你是谁？",
                    "--max_new_tokens", "4", "--temperature", "0")
    assert f"found at {resolved.path}" in chatted

    shown = stage("settings")
    assert str(disk / "model-cache") in shown and hub.TARGET_MODEL in shown

    assert len(calls) == 1  # downloaded once, in notebook 02
    assert not any(home.rglob("models--*"))  # nothing on the system disk
