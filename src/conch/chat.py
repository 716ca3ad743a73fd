"""Stage 4: talk to a model. The one generation function of the project.

Notebooks, the CLI, the evaluator and the server all call `generate` / `stream` here, so the
seeds' classic mistakes are fixed once:

- the prompt goes through the model's own chat template (never raw text);
- length is ``max_new_tokens`` (``max_length`` would count the prompt too);
- only the new tokens are decoded: the prompt is never echoed back;
- DeepSeek-R1's reasoning (``<think>…</think>``) is split from the answer, and a missing or
  unclosed think tag does not break the split;
- sampling defaults come from the model's own generation_config (R1: temperature 0.6,
  top_p 0.95); ``temperature=0`` means greedy, for reproducible checks.

Budgets and sampling follow the model, here and nowhere else (`budget`, `model_sampling`): a
reasoning model (R1, told from its chat template) gets ``THINK_TOKENS`` more new tokens to think in,
and DeepSeek's 0.6 / 0.95 where its generation_config does not say; the evaluator, the CLI, the
exporter's check and both serving engines ask these two functions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ConchError
from .reasoning import (THINK_CLOSE, THINK_OPEN, cut_at_stop, is_reasoning_model,  # noqa: F401
                        prompt_opens_think, split_reasoning)

THINK_TOKENS = 1024  # added for a reasoning model's <think> block: R1 thinks for hundreds of tokens on a plain question
R1_SAMPLING = (0.6, 0.95)  # DeepSeek's recommended temperature and top_p for R1 and its distills (model card)


@dataclass
class GenConfig:
    max_new_tokens: int | None = None  # all new tokens, thinking included; None: `budget` (answer_tokens + thinking)
    answer_tokens: int = 256  # the answer's own length when max_new_tokens is None
    temperature: float | None = None  # None: the model's default; 0: greedy
    top_p: float | None = None  # None: the model's default
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)  # extra stop strings
    seed: int | None = None


@dataclass
class Reply:
    text: str  # everything the model generated (special tokens removed)
    reasoning: str  # inside <think>…</think>; "" when the model did not reason
    answer: str  # what the user should see
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end token or stop string) or "length" (hit max_new_tokens)

    @property
    def cut_while_thinking(self) -> bool:
        """Stopped by the budget inside its <think> block: there is no answer to score."""
        return self.finish_reason == "length" and bool(self.reasoning) and not self.answer


Messages = list[dict]


def to_messages(question: str | Messages, system: str | None = None,
                history: list[tuple[str, str]] | None = None) -> Messages:
    """A question (with optional system prompt and earlier turns) as chat messages."""
    if not isinstance(question, str):
        return list(question)
    messages: Messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in history or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer, messages: Messages) -> str:
    """The exact text the model sees, ending where its answer starts (the generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConchError("this tokenizer has no chat template; use an instruct/chat model "
                         "(its tokenizer_config.json or chat_template.jinja must define one).")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def budget(tokenizer, answer_tokens: int) -> int:
    """New tokens to allow for an answer of ``answer_tokens``: a reasoning model gets ``THINK_TOKENS`` more for its
    ``<think>`` block (else it is cut while thinking and gives no answer at all); the demo gets the answer's own."""
    return answer_tokens + (THINK_TOKENS if is_reasoning_model(tokenizer) else 0)


def new_token_limit(gen: GenConfig, tokenizer) -> int:
    """``gen.max_new_tokens`` when set, else `budget` of its ``answer_tokens``."""
    n = gen.max_new_tokens if gen.max_new_tokens is not None else budget(tokenizer, gen.answer_tokens)
    if n < 1:
        raise ConchError(f"max_new_tokens must be at least 1, got {n}.")
    return n


def model_sampling(generation_config, reasoning: bool) -> tuple[float, float]:
    """(temperature, top_p) for a request that leaves them out, 0 meaning greedy; one rule for chat, the evaluator
    and both serving engines: the model's generation_config where it samples (R1's file says 0.6 / 0.95), DeepSeek's
    0.6 / 0.95 for a reasoning model whose file does not (greedy R1 repeats itself), else greedy, as ``generate``."""
    config = generation_config if isinstance(generation_config, dict) else generation_config.to_dict()
    if config.get("do_sample") and config.get("temperature"):
        return float(config["temperature"]), float(config.get("top_p") or 1.0)
    return R1_SAMPLING if reasoning else (0.0, 1.0)


def sampling_kwargs(model, tokenizer, gen: GenConfig) -> dict:
    """generate() kwargs: `model_sampling` unless the caller overrides it."""
    temperature, top_p = model_sampling(model.generation_config, is_reasoning_model(tokenizer))
    temperature = gen.temperature if gen.temperature is not None else temperature
    if not temperature:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    top_p = gen.top_p if gen.top_p is not None else top_p
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def _generate_kwargs(model, tokenizer, gen: GenConfig) -> dict:
    kwargs = dict(max_new_tokens=new_token_limit(gen, tokenizer), repetition_penalty=gen.repetition_penalty,
                  pad_token_id=tokenizer.pad_token_id, **sampling_kwargs(model, tokenizer, gen))
    if gen.stop:
        kwargs.update(stop_strings=list(gen.stop), tokenizer=tokenizer)
    if gen.seed is not None:
        import torch

        torch.manual_seed(gen.seed)
    return kwargs


def generate(model, tokenizer, prompts: list[str | Messages] | str | Messages,
             gen: GenConfig | None = None, system: str | None = None) -> list[Reply] | Reply:
    """Answer one question or a batch of them (batched on the model: left padding).

    A single prompt (a string or one message list) returns one `Reply`; a list returns a list.
    """
    import torch

    gen = gen or GenConfig()
    single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict))
    batch = [prompts] if single else list(prompts)
    texts = [render_prompt(tokenizer, to_messages(p, system)) for p in batch]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    kwargs = _generate_kwargs(model, tokenizer, gen)
    with torch.inference_mode():
        out = model.generate(**enc, **kwargs)
    new_tokens = out[:, enc["input_ids"].shape[1]:]
    eos = set(eos_ids(model, tokenizer))
    replies = []
    for i, row in enumerate(new_tokens.tolist()):
        ended = next((j for j, t in enumerate(row) if t in eos), None)
        ids = row[:ended] if ended is not None else [t for t in row if t != tokenizer.pad_token_id]
        # a cut at max_new_tokens can end inside a multi-byte character: drop the half character
        text, stopped = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd"), gen.stop)
        reasoning, answer = split_reasoning(text, prompt_opens_think(texts[i]))
        finish = "stop" if ended is not None or stopped or len(ids) < kwargs["max_new_tokens"] else "length"
        replies.append(Reply(text, reasoning, answer, int(enc["attention_mask"][i].sum()), len(ids), finish))
    return replies[0] if single else replies


def eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def stream(model, tokenizer, question: str | Messages, gen: GenConfig | None = None,
           system: str | None = None) -> Iterator[str]:
    """Yield the answer's text piece by piece as tokens come (reasoning included, raw)."""
    from transformers import TextIteratorStreamer

    gen = gen or GenConfig()
    text = render_prompt(tokenizer, to_messages(question, system))
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**enc, streamer=streamer, **_generate_kwargs(model, tokenizer, gen))
    errors: list[BaseException] = []

    def work():
        try:
            import torch

            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # surface the worker's error in the caller's thread
            errors.append(e)
            streamer.on_finalized_text("", stream_end=True)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    seen = ""
    for piece in streamer:
        seen += piece
        cut, stopped = cut_at_stop(seen, gen.stop)
        if stopped:
            yield cut[len(seen) - len(piece):] if len(cut) > len(seen) - len(piece) else ""
            break
        yield piece
    worker.join()
    if errors:
        raise errors[0]


def load(model: str | Path = "auto", adapter: str | Path | None = None, device=None):
    """Load a model for chat: a base (``auto``/``demo``/hub id/folder), optionally with a LoRA
    adapter on top, or a merged folder. Returns ``(model, tokenizer)``."""
    from . import hub

    path = Path(model) if Path(str(model)).is_dir() else hub.resolve(str(model)).path
    base, tokenizer = hub.load_model(path, device)
    if adapter is None:
        return base, tokenizer
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise ConchError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json); "
                         "pass the training output folder, e.g. outputs/magic_conch_lora.")
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def chat_loop(model, tokenizer, gen: GenConfig | None = None, system: str | None = None) -> None:
    """An interactive terminal chat: type a message; /reset forgets the history; /exit quits."""
    history: Messages = [{"role": "system", "content": system}] if system else []
    print("Chat with the model. /reset clears the history, /exit quits.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            print("(history cleared)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("conch> ", end="", flush=True)
        opened = prompt_opens_think(render_prompt(tokenizer, history))
        text = ""
        for piece in stream(model, tokenizer, history, gen):
            print(piece, end="", flush=True)
            text += piece
        print()
        history.append({"role": "assistant", "content": split_reasoning(text, opened)[1] or text})
