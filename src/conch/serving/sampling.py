"""Choosing the next token for a batch of requests, each with its own settings, and showing text.

- `SamplingParams`: what one request asks for (temperature, top_p, penalties, seed, logprobs, stops);
- `sample`: one step for a whole batch: penalties, temperature, top-p, then a draw from each
  request's own `torch.Generator` (seeded from ``seed``, or at random), greedy where temperature is 0;
- `Detokenizer`: token ids to text incrementally (vLLM's prefix/read offsets): each step decodes a
  few tokens, not the whole answer again, and holds back half a UTF-8 character.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    frequency_penalty: float = 0.0  # OpenAI: minus penalty × how often the token was generated
    presence_penalty: float = 0.0  # OpenAI: minus penalty once a token was generated
    repetition_penalty: float = 1.0  # transformers/vLLM: divide the logit of any token seen (prompt too)
    seed: int | None = None  # None: a random seed, so two requests differ
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)

    def generator(self, device) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator(device=device).manual_seed(seed)

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """One row of logits with the request's repetition, frequency and presence penalties applied."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits.clamp(-1e4, 1e4)  # an extreme penalty must not turn into inf (and NaN probabilities)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """The next token for every row of ``logits`` (already penalised), each row with its own settings."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    greedy = logits.argmax(-1)
    if not (temps > 0).any():
        return greedy
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # keep the smallest set of tokens whose probability reaches top_p (always the first)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    tokens = greedy.clone()
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature > 0:
            choice = torch.multinomial(sorted_probs[i], 1, generator=g)
            tokens[i] = order[i, choice[0]]
    return tokens


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under one row of logits, and the ``top`` most likely tokens."""
    logp = torch.log_softmax(logits.float(), -1)
    best = logp.topk(top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return float(logp[token]), alternatives


class Detokenizer:
    """Token ids in, new text out, decoding only a short window each time."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode from `prefix`; text up to `read` was returned already

    def add(self, token: int) -> str:
        """Append one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back when the answer ends: the complete characters decoded so far (a partial
        character at the very end is dropped, as ``chat.generate`` drops it)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True).rstrip("\ufffd")
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
