"""The learner's settings: one small file that every notebook kernel and every command reads.

A notebook kernel on AutoDL does not see what you ``export`` in a terminal, and every notebook
starts a fresh kernel, so the choices made once (in notebook 02 or with ``conch download``) are
written to ``conch_settings.yaml`` at the root of the repository:

- ``source``: where models come from: ``huggingface``, ``mirror`` (huggingface through
  ``https://hf-mirror.com``) or ``modelscope``;
- ``cache_dir``: where downloads go;
- ``base_model``: what ``base_model=auto`` means on this machine, once you have chosen a model;
- ``models``: the local folder of every hub model downloaded so far, so that later stages load
  it from disk instead of downloading it again.

Environment variables override the file: ``CONCH_MODEL_SOURCE``, ``CONCH_CACHE_DIR``,
``CONCH_BASE_MODEL`` (``HF_ENDPOINT`` sets the Hugging Face server). ``CONCH_SETTINGS`` moves the
file. Defaults: on a machine with an AutoDL data disk (``/root/autodl-tmp``, or ``$CONCH_DATA_DISK``)
the cache is ``<data disk>/model-cache`` and the source is the mirror; elsewhere the libraries'
own caches (``~/.cache/huggingface``, ``~/.cache/modelscope``) and huggingface.co.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .config import read_yaml_mapping
from .errors import ConchError
from .paths import shown

FILENAME = "conch_settings.yaml"
SOURCES = ("huggingface", "mirror", "modelscope")
MIRROR = "https://hf-mirror.com"
AUTODL_DATA_DISK = "/root/autodl-tmp"
KEYS = ("source", "cache_dir", "base_model", "models")
HEADER = ("# The Magic Conch's settings for this machine, written by notebook 02 and `conch download`,\n"
          "# read by every notebook and command. Environment variables override them: CONCH_MODEL_SOURCE,\n"
          "# CONCH_CACHE_DIR, CONCH_BASE_MODEL. Edit or delete this file freely.\n")


def settings_path() -> Path:
    """``$CONCH_SETTINGS`` or ``conch_settings.yaml`` at the repository root."""
    from .paths import repo_root

    return Path(os.environ.get("CONCH_SETTINGS") or repo_root() / FILENAME)


def data_disk() -> Path | None:
    """AutoDL's data disk (``/root/autodl-tmp``, or ``$CONCH_DATA_DISK``) where it exists, else None."""
    path = Path(os.environ.get("CONCH_DATA_DISK") or AUTODL_DATA_DISK)
    return path if path.is_dir() else None


@dataclass
class Settings:
    source: str  # huggingface | mirror | modelscope
    endpoint: str | None  # the Hugging Face server (huggingface and mirror); None: huggingface.co
    cache_dir: str | None  # where downloads go; None: the library's own default
    base_model: str | None  # what base_model=auto means here; None: the GPU/CPU rule
    models: dict = field(default_factory=dict)  # hub id -> {"path": folder, "source": ..., "revision": ...}
    path: Path = Path(FILENAME)  # the settings file
    origin: dict = field(default_factory=dict)  # setting -> where its value came from

    def recorded_model(self, repo_id: str, revision: str | None = None) -> Path | None:
        """The folder an earlier download of ``repo_id`` left, if it is still complete."""
        entry = self.models.get(repo_id)
        if not isinstance(entry, dict) or (revision and entry.get("revision") != revision):
            return None
        folder = Path(str(entry.get("path", "")))
        complete = (folder / "config.json").exists() and any(folder.glob("*.safetensors"))
        return folder if complete else None

    def __str__(self) -> str:
        exists = "" if self.path.exists() else " (not written yet)"
        rows = [("settings file", f"{shown(self.path)}{exists}"),
                ("source", self.source), ("endpoint", self.endpoint or "https://huggingface.co"),
                ("cache_dir", self.cache_dir or "(the library's default under ~/.cache)"),
                ("base_model", self.base_model or "(auto: the 1.5B model with a CUDA GPU, demo without)")]
        lines = [f"{k:<14}{v}" + (f"   <- {self.origin[k]}" if k in self.origin else "") for k, v in rows]
        lines += [f"{'downloaded':<14}{repo} -> {shown(entry['path']) if entry.get('path') else None}"
                  for repo, entry in self.models.items() if isinstance(entry, dict)]
        return "\n".join(lines)


def read_file(path: Path | None = None) -> dict:
    """The settings file as a dict ({} when there is none), checked."""
    path = Path(path or settings_path())
    if not path.exists():
        return {}
    data = read_yaml_mapping(path, deletable=True)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConchError(f"{path}: unknown setting '{unknown[0]}'; valid settings are: {', '.join(KEYS)}.")
    return data


def check_source(source: str, where: str) -> str:
    if source not in SOURCES:
        raise ConchError(f"model source '{source}' (from {where}) is unknown; use one of {', '.join(SOURCES)}.")
    return source


def load(source: str | None = None, cache_dir: str | None = None) -> Settings:
    """The settings in effect: arguments, then environment variables, then the file, then defaults.

    ``source=None`` or ``"auto"`` and ``cache_dir=None`` mean "not chosen here".
    """
    path = settings_path()
    file = read_file(path)
    in_file = f"{path.name}"
    disk = data_disk()
    origin = {}

    def pick(key, argument, env_name, default, default_why):
        for value, why in ((argument, "the argument"), (os.environ.get(env_name), env_name), (file.get(key), in_file)):
            if value not in (None, "", "auto"):
                origin[key] = why
                return str(value)
        if default_why:
            origin[key] = default_why
        return default

    on_autodl = f"default where the AutoDL data disk {disk} exists" if disk else None
    source = pick("source", source, "CONCH_MODEL_SOURCE", "mirror" if disk else "huggingface", on_autodl)
    check_source(source, origin.get("source", "default"))
    if source == "modelscope":
        endpoint = None
    elif os.environ.get("HF_ENDPOINT"):
        endpoint, origin["endpoint"] = os.environ["HF_ENDPOINT"].rstrip("/"), "HF_ENDPOINT"
    else:
        endpoint = MIRROR if source == "mirror" else None
    library_env = "MODELSCOPE_CACHE" if source == "modelscope" else ("HF_HUB_CACHE" if os.environ.get("HF_HUB_CACHE")
                                                                     else "HF_HOME")
    if os.environ.get(library_env):  # the learner's own library setting wins over the data-disk default
        default_cache, default_why = None, f"{library_env}={os.environ[library_env]}"
    else:
        default_cache, default_why = (str(disk / "model-cache"), on_autodl) if disk else (None, None)
    cache = pick("cache_dir", cache_dir, "CONCH_CACHE_DIR", default_cache, default_why)
    base_model = pick("base_model", None, "CONCH_BASE_MODEL", None, None)
    models = file.get("models") or {}
    if not isinstance(models, dict):
        raise ConchError(f"{path}: 'models' must map hub ids to folders; fix it or delete the line.")
    return Settings(source, endpoint, cache, base_model, models, path, origin)


def save(**changes) -> Path:
    """Write ``changes`` into the settings file (a value of None removes that setting).

    Written to a temporary file and renamed, so a crash never leaves half a file.
    """
    import yaml

    unknown = sorted(set(changes) - set(KEYS))
    if unknown:
        raise ConchError(f"unknown setting '{unknown[0]}'; valid settings are: {', '.join(KEYS)}.")
    path = settings_path()
    data = read_file(path)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    if not data and not path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER + yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path


def remember_model(repo_id: str, folder: str | Path, source: str, revision: str | None = None) -> Path:
    """Record where a download of ``repo_id`` lies, for every later kernel and command."""
    models = dict(read_file().get("models") or {})
    models[repo_id] = {"path": str(Path(folder).resolve()), "source": source,
                       **({"revision": revision} if revision else {})}
    return save(models=models)


def versions(constraints: str | Path | None = None) -> str:
    """Python and the main libraries here, beside the versions the notebooks were last run with (constraints.txt)."""
    import platform
    from importlib import metadata

    from .paths import repo_root

    path = Path(constraints or repo_root() / "constraints.txt")
    pinned = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            spec = line.split("#")[0].split(";")[0].strip()
            if "==" in spec:
                name, version = spec.split("==", 1)
                pinned[name.strip().lower().replace("_", "-")] = version.strip()
    rows = [("python", platform.python_version(), "3.11")]
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "huggingface-hub", "fastapi"):
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = "(not installed)"
        rows.append((name, here, pinned.get(name, "(not pinned: the image's own)" if name == "torch" else "-")))
    lines = [f"{'package':<16}{'here':<22}notebooks ran with"]
    lines += [f"{n:<16}{h:<22}{p}" + ("" if p in ("-", h) or p.startswith("(") or h.startswith(p) else "   <- differs")
              for n, h, p in rows]
    return "\n".join(lines)
