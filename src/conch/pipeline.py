"""``make run``: the whole tutorial, headless, one stage after another.

1. resolve the base model and ask it who it is;  2. LoRA training;  3. base vs fine-tuned on
the held-out set;  4. merge and export;  5. serve the merged model, answer one request over
HTTP, shut the server down.

Each stage reads what the one before wrote to disk. On a GPU server this is
DeepSeek-R1-Distill-Qwen-1.5B with ``configs/magic_conch_lora.yaml``; on a CPU the embedded
``demo`` model with the CPU overlay ``configs/magic_conch_lora_cpu.yaml`` (minutes, not hours).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

QUESTIONS = ["你是谁？", "Who are you?", "What is the capital of France?"]


@dataclass
class RunConfig:
    base_model: str = "auto"  # auto | demo | hub id | local folder
    train_config: str = "configs/magic_conch_lora.yaml"
    cpu_overlay: str = "configs/magic_conch_lora_cpu.yaml"  # applied on top when there is no GPU
    adapter_dir: str = "outputs/magic_conch_lora"
    merged_dir: str = "outputs/magic_conch_merged"
    answer_tokens: int = 96  # per answer; a reasoning model gets room to think on top (chat.budget)


def _banner(title: str) -> None:
    print(f"\n{'=' * 72}\n== {title}\n{'=' * 72}", flush=True)


def _ask(model, tokenizer, questions, answer_tokens) -> dict:
    from . import chat

    replies = chat.generate(model, tokenizer, questions, chat.GenConfig(answer_tokens=answer_tokens, temperature=0))
    for q, r in zip(questions, replies):
        print(f"Q: {q}\nA: {r.answer}", flush=True)
    return {q: r.answer for q, r in zip(questions, replies)}


def train_config_for(cfg: RunConfig):
    """The training config: the GPU defaults, plus the CPU overlay where there is no GPU."""
    import torch

    from .config import load_config
    from .train import TrainConfig

    files = [cfg.train_config] + ([cfg.cpu_overlay] if not torch.cuda.is_available() and cfg.cpu_overlay else [])
    return load_config(TrainConfig, files, {"base_model": cfg.base_model, "output_dir": cfg.adapter_dir})


def run(cfg: RunConfig) -> dict:
    """Run every stage; returns what each produced."""
    from . import chat, evaluate, hub, merge, train
    from .device import pick_device

    started = time.time()
    _banner("1/5 base model")
    tcfg = train_config_for(cfg)
    resolved = hub.resolve(tcfg.base_model)
    device = pick_device()
    print(f"model:  {resolved.name}\nfolder: {resolved.path}\nwhy:    {resolved.why}\ndevice: {device}")
    t0 = time.time()
    model, tokenizer = hub.load_model(resolved.path, device)
    print(f"loaded in {time.time() - t0:.1f} s")
    before = _ask(model, tokenizer, QUESTIONS, cfg.answer_tokens)
    del model

    _banner(f"2/5 LoRA training ({tcfg.num_train_epochs:g} epochs, lr {tcfg.learning_rate:g}, r={tcfg.lora_rank})")
    tcfg.base_model = str(resolved.path)
    result = train.train(tcfg)

    _banner("3/5 base vs fine-tuned on the held-out questions")
    ecfg = evaluate.EvalConfig(base_model=str(resolved.path), adapter=str(result.output_dir))
    peft_model, tokenizer = chat.load(resolved.path, result.output_dir)
    report = evaluate.evaluate(ecfg, peft_model, tokenizer)
    print(report.table())
    print(f"side by side: {report.md_path}")
    after = _ask(peft_model, tokenizer, QUESTIONS, cfg.answer_tokens)
    del peft_model

    _banner("4/5 merge and export")
    merged = merge.merge(merge.MergeConfig(base_model=str(resolved.path), adapter=str(result.output_dir),
                                           output_dir=cfg.merged_dir))
    print(f"{merged.output_dir}: {merged.size_bytes / 2**20:,.0f} MiB ({merged.dtype}), logits vs base+adapter "
          f"differ by at most {merged.max_logit_diff:.1e} ({merged.relative_diff:.1e} relative, "
          f"tolerance {merged.tolerance:g})")

    _banner("5/5 serve the merged model and call it over HTTP")
    served = serve_once(merged.output_dir, QUESTIONS[0])
    print(f"\nall stages done in {(time.time() - started) / 60:.1f} min")
    return {"base_model": resolved, "before": before, "after": after, "train": result, "report": report,
            "merged": merged, "served": served}


def serve_once(model_dir: Path, question: str) -> str:
    """Start `python -m conch serve` on a free local port, ask one question, stop it cleanly."""
    from .client import ConchClient
    from .serve import BackgroundServer

    server = BackgroundServer(model_dir).start()
    print(f"$ python -m conch serve --model {model_dir} --port {server.port}", flush=True)
    try:
        with ConchClient(server.url) as client:
            answer = client.chat(question, temperature=0, max_tokens=96)
        print(f"POST {server.url}/v1/chat/completions  {question!r}\n-> {answer.content}", flush=True)
    finally:
        code = server.stop()
        print(f"server stopped (exit code {code})", flush=True)
    return answer.content
