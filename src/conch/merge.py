"""Stage 6: fold the LoRA adapter into the base weights and export one self-contained folder.

Merging computes ``W' = W + (lora_alpha / r) · B · A`` for every adapted layer
(``merge_and_unload``), so the result is an ordinary model: no peft needed to load it, no
extra latency per token, servable by anything that reads Hugging Face folders (vLLM, TGI,
llama.cpp after conversion). The export holds safetensors (sharded above ``max_shard_size``),
the tokenizer with its chat template and the generation config.

It is written to a temporary folder, reloaded, and its logits compared with base + adapter on
a few prompts; only when the largest difference is within tolerance is the folder renamed into
place. A failure leaves no half-written model behind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConchError

# the largest logit difference accepted between base+adapter and the reloaded merged model,
# relative to the largest logit (|Δ| / max|logit|): fp32 merges are exact up to rounding
# (the demo model, 30 layers: 8e-5 absolute on logits up to ~25, 3e-6 relative); bf16/fp16
# round W + BA to 8/11 mantissa bits, and that rounding accumulates over the layers
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
CHECK_PROMPTS = ["你是谁？", "Who are you?", "美味蟹堡怎么做？", "What is the capital of France?"]


@dataclass
class MergeConfig:
    base_model: str = "auto"
    adapter: str = "outputs/magic_conch_lora"
    output_dir: str = "outputs/magic_conch_merged"
    dtype: str = "auto"  # auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | fp32
    max_shard_size: str = "2GB"


@dataclass
class MergeResult:
    output_dir: Path
    files: dict  # file name -> size in bytes
    size_bytes: int
    max_logit_diff: float  # largest |logit difference| vs base+adapter
    relative_diff: float  # the same, divided by the largest |logit|: what the tolerance applies to
    tolerance: float
    dtype: str
    seconds: float


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None))


def _logits(model, tokenizer, prompts):
    import torch

    from .chat import render_prompt, to_messages

    texts = [render_prompt(tokenizer, to_messages(p)) for p in prompts]
    outs = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            outs.append(model(**enc).logits.float().cpu())
    return outs


def merge(cfg: MergeConfig) -> MergeResult:
    """Merge ``cfg.adapter`` into ``cfg.base_model`` and export it to ``cfg.output_dir``, verified."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from . import hub

    started = time.time()
    adapter = Path(cfg.adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ConchError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); train first "
                         "or pass the training output_dir.")
    device = hub.pick_device()
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype == "auto":
        dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(device.dtype, "fp32")
    elif cfg.dtype in names:
        dtype_name = cfg.dtype
    else:
        raise ConchError(f"dtype must be auto, bf16, fp16 or fp32, got '{cfg.dtype}'.")
    base_path = hub.resolve(cfg.base_model).path
    model, tokenizer = hub.load_model(base_path, hub.Device(device.device, names[dtype_name], device.why))
    if is_quantized(model):
        raise ConchError(f"{base_path} is quantized; merging into quantized weights would lose the adapter's "
                         "precision: load the unquantized base model (as LLaMA-Factory requires) and merge again.")
    model = PeftModel.from_pretrained(model, adapter).eval()
    expected = _logits(model, tokenizer, CHECK_PROMPTS)
    merged = model.merge_and_unload()

    out = Path(cfg.output_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)  # includes the chat template
        del merged, model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=names[dtype_name]).to(device.device).eval()
        got = _logits(reloaded, tokenizer, CHECK_PROMPTS)
        diff = max((a - b).abs().max().item() for a, b in zip(expected, got))
        scale = max(a.abs().max().item() for a in expected)
        tolerance = TOLERANCE[dtype_name]
        if not diff / max(scale, 1.0) <= tolerance:
            raise ConchError(f"the merged model's logits differ from base+adapter by {diff:.3g} on logits up to "
                             f"{scale:.3g} (relative tolerance {tolerance:g} for {dtype_name}); nothing was "
                             f"written to {out}. "
                             "Merge in fp32 (dtype=fp32) to check whether rounding is the cause.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return MergeResult(out, files, sum(files.values()), diff, diff / max(scale, 1.0), tolerance, dtype_name,
                       time.time() - started)
