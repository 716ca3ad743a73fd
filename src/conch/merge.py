"""Stage 6: fold the LoRA adapter into the base weights and export one self-contained folder.

Merging computes ``W' = W + (lora_alpha / r) · B · A`` for every adapted layer
(``merge_and_unload``), so the result is an ordinary model: no peft needed to load it, no
extra latency per token, servable by anything that reads Hugging Face folders (vLLM, TGI,
llama.cpp after conversion). The export holds safetensors (sharded above ``max_shard_size``),
the tokenizer with its chat template and the generation config.

The merge is always computed and verified in **fp32**: base + adapter and the merged model give
the same logits on a few prompts up to rounding (relative 1e-4), or nothing is written. Only then
is the model cast to the dtype it is saved in (``dtype``: auto = bf16 on a GPU that supports it,
what a GPU serves and what DeepSeek-R1-Distill-Qwen-1.5B is published in, half the disk of fp32;
fp32 on a CPU, where bf16 is slower and gains nothing). A bf16 copy is *not* the same model: it
rounds every weight to 8 mantissa bits, so its logits drift and a greedy answer can take another
path at a near-tie. That drift is measured and reported (``saved_drift``, ``saved_top1``), and only
a drift beyond ``TOLERANCE`` (a broken export, not rounding) stops the export. `compare` measures
the same on whole greedy answers.

It is written to a temporary folder, reloaded and checked, then renamed into place: a failure
leaves no half-written model behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConchError
from .paths import staged

# the largest logit difference accepted between base+adapter (fp32) and the merged model, relative to
# the largest logit (|Δ| / max|logit|). fp32: the merge check proper, exact up to rounding (the demo model,
# 30 layers: 8e-5 absolute on logits up to ~25, 3e-6 relative). fp16/bf16: the saved copy rounds W + BA to
# 11/8 mantissa bits and the rounding accumulates over the layers; these bounds only catch a broken export,
# the drift itself is reported, not required to be zero
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
CHECK_PROMPTS = ["你是谁？", "Who are you?", "美味蟹堡怎么做？", "What is the capital of France?"]


@dataclass
class MergeConfig:
    base_model: str = "auto"
    adapter: str = "outputs/magic_conch_lora"
    output_dir: str = "outputs/magic_conch_merged"
    dtype: str = "auto"  # the saved dtype: auto (bf16 on capable GPUs, fp32 on CPU) | bf16 | fp16 | fp32;
    # the merge itself is always done and verified in fp32
    max_shard_size: str = "2GB"


@dataclass
class MergeResult:
    output_dir: Path
    files: dict  # file name -> size in bytes
    size_bytes: int
    max_logit_diff: float  # fp32 merge: largest |logit difference| vs base+adapter (fp32)
    relative_diff: float  # the same, divided by the largest |logit|: what the tolerance applies to
    tolerance: float  # for relative_diff: TOLERANCE["fp32"]
    dtype: str  # the saved dtype
    seconds: float
    saved_drift: float = 0.0  # the saved copy, reloaded, vs base+adapter in fp32: relative logit difference
    saved_top1: float = 1.0  # share of the check prompts' positions where the saved copy's top token is the same


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


def _difference(expected, got) -> tuple[float, float]:
    """Largest |logit difference| and the same relative to the largest |logit| of ``expected``."""
    diff = max((a - b).abs().max().item() for a, b in zip(expected, got))
    scale = max(a.abs().max().item() for a in expected)
    return diff, diff / max(scale, 1.0)


def _top1(expected, got) -> float:
    """Share of positions where both give the same top token."""
    same = [(a[0].argmax(-1) == b[0].argmax(-1)) for a, b in zip(expected, got)]
    return sum(x.sum().item() for x in same) / max(sum(len(x) for x in same), 1)


@dataclass
class Comparison:
    """Greedy answers of a candidate model against a reference model on the same questions."""

    rows: list[tuple[str, str, str]]  # question, reference answer, candidate answer
    identical: int  # whole answers identical
    tokens_same: float  # share of the reference's answer tokens the candidate reproduces before it first differs
    top1: float  # teacher-forced on the reference answers: share of positions with the same top token
    drift: float  # teacher-forced: largest |logit difference| relative to the largest |logit|

    def __str__(self) -> str:
        return (f"whole answers identical {self.identical}/{len(self.rows)}, greedy tokens identical before the "
                f"first difference {self.tokens_same:.1%}, top token as the reference (teacher-forced) "
                f"{self.top1:.1%}, relative logit drift {self.drift:.1e}")


def compare(reference, candidates: dict, tokenizer, questions: list[str],
            max_new_tokens: int = 48) -> dict[str, Comparison]:
    """Greedy answers of each model in ``candidates`` (name -> model) against ``reference``'s (e.g. base +
    adapter in fp32 against the merged model in fp32 and in bf16): how many whole answers are identical, the
    share of the reference's greedy tokens matched before the first difference, and, feeding every model the
    reference's answers token by token, the top-token agreement and the logit drift."""
    import torch

    from .chat import GenConfig, eos_ids, render_prompt, sampling_kwargs, to_messages

    texts = [render_prompt(tokenizer, to_messages(q)) for q in questions]

    def greedy(model):
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        finally:
            tokenizer.padding_side = side
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling_kwargs(model, tokenizer, GenConfig(temperature=0)))
        stop = set(eos_ids(model, tokenizer))
        rows = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            rows.append(row[:next((i for i, t in enumerate(row) if t in stop), len(row))])
        return rows

    def forced(model, ref_ids):
        logits = []
        with torch.inference_mode():
            for text, ids in zip(texts, ref_ids):
                prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
                full = torch.tensor([prompt + ids], device=model.device)
                logits.append(model(input_ids=full).logits.float()[0, len(prompt) - 1:-1].cpu())
        return logits

    ref_ids = greedy(reference)
    ref_logits = forced(reference, ref_ids)
    scale = max(max((a.abs().max().item() for a in ref_logits if len(a)), default=0.0), 1.0)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    results = {}
    for name, model in candidates.items():
        ids = greedy(model)
        logits = forced(model, ref_ids)
        prefix = [next((i for i, (a, b) in enumerate(zip(r, c)) if a != b), min(len(r), len(c)))
                  for r, c in zip(ref_ids, ids)]
        agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(ref_logits, logits))
        drift = max(((a - b).abs().max().item() for a, b in zip(ref_logits, logits) if len(a)), default=0.0)
        results[name] = Comparison([(q, decode(r), decode(c)) for q, r, c in zip(questions, ref_ids, ids)],
                                   sum(r == c for r, c in zip(ref_ids, ids)),
                                   sum(prefix) / max(sum(len(r) for r in ref_ids), 1),
                                   agree / max(sum(len(r) for r in ref_ids), 1), drift / scale)
    return results


def merge(cfg: MergeConfig) -> MergeResult:
    """Merge ``cfg.adapter`` into ``cfg.base_model`` and export it to ``cfg.output_dir``, verified."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from . import hub
    from .device import Device, pick_device

    started = time.time()
    adapter = Path(cfg.adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ConchError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); train first "
                         "or pass the training output_dir.")
    device = pick_device()
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype == "auto":
        dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(device.dtype, "fp32")
    elif cfg.dtype in names:
        dtype_name = cfg.dtype
    else:
        raise ConchError(f"dtype must be auto, bf16, fp16 or fp32, got '{cfg.dtype}'.")
    base_path = hub.resolve(cfg.base_model).path
    # merged and verified in fp32 (the 1.5B: 7 GB), whatever it is saved in
    model, tokenizer = hub.load_model(base_path, Device(device.device, torch.float32, "merge in fp32"))
    if is_quantized(model):
        raise ConchError(f"{base_path} is quantized; merging into quantized weights would lose the adapter's "
                         "precision: load the unquantized base model (as LLaMA-Factory requires) and merge again.")
    model = PeftModel.from_pretrained(model, adapter).eval()
    expected = _logits(model, tokenizer, CHECK_PROMPTS)
    merged = model.merge_and_unload()
    diff, rel = _difference(expected, _logits(merged, tokenizer, CHECK_PROMPTS))
    tolerance = TOLERANCE["fp32"]
    out = Path(cfg.output_dir)
    if not rel <= tolerance:
        raise ConchError(f"the merged model's logits differ from base+adapter by {diff:.3g} ({rel:.2g} of the largest "
                         f"logit; tolerance {tolerance:g} in fp32); nothing was written to {out}.")
    if dtype_name != "fp32":
        merged = merged.to(names[dtype_name])
        merged.config.dtype = names[dtype_name]  # config.json says what the weights are

    with staged(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        tokenizer.save_pretrained(tmp)  # includes the chat template
        del merged, model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=names[dtype_name]).to(device.device).eval()
        got = _logits(reloaded, tokenizer, CHECK_PROMPTS)
        saved_diff, saved_rel = _difference(expected, got)
        top1 = _top1(expected, got)
        if not saved_rel <= TOLERANCE[dtype_name]:
            raise ConchError(f"the saved {dtype_name} model's logits differ from base+adapter by {saved_diff:.3g} "
                             f"({saved_rel:.2g} of the largest logit; at most {TOLERANCE[dtype_name]:g} expected for "
                             f"{dtype_name}); nothing was written to {out}. Save in fp32 (dtype=fp32) to compare.")
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return MergeResult(out, files, sum(files.values()), diff, rel, tolerance, dtype_name, time.time() - started,
                       saved_rel, top1)
