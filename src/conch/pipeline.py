"""``make run``: the whole tutorial, headless, one stage after another.

Each stage reads what the one before wrote to disk. On a CPU machine everything runs on the
embedded ``demo`` model with small settings; on a GPU server on DeepSeek-R1-Distill-Qwen-1.5B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

QUESTIONS = ["你是谁？", "Who are you?", "What is the capital of France?"]


@dataclass
class RunConfig:
    base_model: str = "auto"  # auto | demo | hub id | local folder
    source: str = "huggingface"  # huggingface | modelscope
    max_new_tokens: int = 64


def run(cfg: RunConfig) -> dict:
    """Run every stage; returns what each stage produced (paths, answers)."""
    from . import chat, hub

    print("== 1. base model")
    resolved = hub.resolve(cfg.base_model, source=cfg.source)
    device = hub.pick_device()
    print(f"model:  {resolved.name}\nfolder: {resolved.path}\nwhy:    {resolved.why}\ndevice: {device}")
    started = time.time()
    model, tokenizer = hub.load_model(resolved.path, device)
    print(f"loaded in {time.time() - started:.1f} s")
    gen = chat.GenConfig(max_new_tokens=cfg.max_new_tokens, temperature=0)
    answers = {}
    for question, reply in zip(QUESTIONS, chat.generate(model, tokenizer, QUESTIONS, gen)):
        answers[question] = reply.answer
        print(f"Q: {question}\nA: {reply.answer}")
    return {"base_model": resolved, "base_answers": answers}
