"""The serving engine: one worker thread owns the model and generates for many requests at once.

Continuous batching, the way vLLM and TGI do it, in plain PyTorch on transformers' KV cache:

- requests wait in a bounded queue (full: `QueueFull`, which the server turns into 503);
- between two decoding steps the worker admits waiting requests: it runs their prompts
  (prefill, left-padded) and joins their KV cache to the running batch;
- every step decodes one token for every running request, each with its own temperature,
  top_p, max_tokens and stop strings;
- a request that finishes (end token, stop string, max_tokens), is cancelled (client gone) or
  runs out of time leaves the batch at once, and its rows leave the cache.

Each request receives its text through `Request.events`: ``("delta", text)`` pieces, then
``("done", finish_reason)`` or ``("error", message)``. The pieces are safe to show: a partial
UTF-8 character or a partial stop string is held back until it is complete.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .chat import eos_ids


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    timeout_s: float = 120.0
    id: int = field(default_factory=itertools.count().__next__)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the worker
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    finish_reason: str | None = None
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    listener: object = None  # called with each event too (the server bridges them into asyncio)
    inbox: object = None  # the server's asyncio.Queue for this request

    def send(self, kind: str, value) -> None:
        self.events.put((kind, value))
        if self.listener is not None:
            self.listener((kind, value))

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = set(eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.generator = torch.Generator(device=model.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self._stop = threading.Event()
        self._cache = self._mask = self._lengths = self._next = None
        self.steps = 0
        self.prefilling = 0
        self.worker = threading.Thread(target=self._loop, name="conch-engine", daemon=True)
        self.worker.start()

    # -- public ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.waiting.qsize()} requests are already waiting")
        self.waiting.put(request)
        return request

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def active(self) -> int:
        """Requests being generated, including those whose prompt is being read right now."""
        return len(self.running) + self.prefilling

    def shutdown(self) -> None:
        self._stop.set()
        self.worker.join(timeout=10)

    # -- the worker -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.running:
                    try:
                        first = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._admit([first] + self._take(self.max_batch_size - 1))
                elif len(self.running) < self.max_batch_size and not self.waiting.empty():
                    self._admit(self._take(self.max_batch_size - len(self.running)))
                if self.running:
                    self._step()
            except Exception as e:  # never die silently: fail the running requests, keep serving
                for r in self.running:
                    r.send("error", f"generation failed: {type(e).__name__}: {e}")
                self.running, self._cache = [], None

    def _take(self, n: int) -> list[Request]:
        taken = []
        while len(taken) < n:
            try:
                taken.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return taken

    @torch.inference_mode()
    def _admit(self, new: list[Request]) -> None:
        """Prefill the new requests' prompts and join them to the running batch."""
        new = [r for r in new if not self._expired(r)]
        if not new:
            return
        self.prefilling = len(new)
        try:
            self._prefill(new)
        finally:
            self.prefilling = 0

    def _prefill(self, new: list[Request]) -> None:
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(r.prompt_ids) for r in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        lengths = mask.sum(-1)
        next_logits = out.logits[:, -1, :].float()
        if self.running:
            self._cache, self._mask = _join(self._cache, self._mask, cache, mask)
            self._lengths = torch.cat([self._lengths, lengths])
            self._next = torch.cat([self._next, next_logits])
        else:
            self._cache, self._mask, self._lengths, self._next = cache, mask, lengths, next_logits
        self.running += new

    @torch.inference_mode()
    def _step(self) -> None:
        """Sample one token for every running request, then run the model on them."""
        tokens = self._sample(self._next)
        keep = []
        for i, (r, token) in enumerate(zip(self.running, tokens.tolist())):
            if self._expired(r) or r.cancelled.is_set():
                continue
            if r.first_token_at is None:
                r.first_token_at = time.monotonic()
            if token in self.eos:
                self._finish(r, "stop")
                continue
            r.tokens.append(token)
            if self._emit(r):  # a stop string ended it
                continue
            if len(r.tokens) >= r.max_tokens:
                self._finish(r, "length")
                continue
            keep.append(i)
        if len(keep) < len(self.running):
            if not keep:
                self.running, self._cache = [], None
                return
            index = torch.tensor(keep, device=self.model.device)
            self._cache.batch_select_indices(index)
            self._mask, self._lengths, tokens = self._mask[index], self._lengths[index], tokens[index]
            self.running = [self.running[i] for i in keep]
            self._trim()
        device = self.model.device
        self._mask = torch.cat([self._mask, torch.ones((len(keep), 1), dtype=self._mask.dtype, device=device)], -1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self._mask, position_ids=self._lengths[:, None],
                         past_key_values=self._cache, use_cache=True)
        self._lengths = self._lengths + 1
        self._next = out.logits[:, -1, :].float()
        self.steps += 1

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        temps = torch.tensor([r.temperature for r in self.running], device=logits.device)
        greedy = logits.argmax(-1)
        if not (temps > 0).any():
            return greedy
        top_p = torch.tensor([r.top_p for r in self.running], device=logits.device)
        probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest set of tokens whose probability reaches top_p (always the first)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        choice = torch.multinomial(sorted_probs, 1, generator=self.generator).squeeze(-1)
        sampled = order.gather(-1, choice[:, None]).squeeze(-1)
        return torch.where(temps > 0, sampled, greedy)

    def _emit(self, r: Request) -> bool:
        """Decode the request's tokens; send what is safe to show. True when a stop string ended it."""
        r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        for s in r.stop:
            if s and s in r.text:
                r.text = r.text[: r.text.index(s)]
                self._finish(r, "stop")
                return True
        safe = len(r.text)
        if r.text.endswith("\ufffd"):  # half a multi-byte character
            safe = len(r.text.rstrip("\ufffd"))
        for s in r.stop:  # hold back a possible beginning of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if r.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe > r.sent:
            r.send("delta", r.text[r.sent:safe])
            r.sent = safe
        return False

    def _finish(self, r: Request, reason: str) -> None:
        r.text = r.text.rstrip("\ufffd")
        if len(r.text) > r.sent:
            r.send("delta", r.text[r.sent:])
            r.sent = len(r.text)
        r.finish_reason = reason
        r.send("done", reason)

    def _expired(self, r: Request) -> bool:
        if r.cancelled.is_set():
            return True
        if time.monotonic() - r.created > r.timeout_s:
            r.send("error", f"the request took longer than its {r.timeout_s:g} s timeout.")
            r.cancel()
            return True
        return False

    def _trim(self) -> None:
        """Drop cache columns that are padding for every remaining request."""
        real = self._mask.any(0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            self._mask = self._mask[:, start:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _join(cache_a, mask_a, cache_b, mask_b):
    """Stack two left-padded batches (KV caches and attention masks) into one."""
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t, n, dim):
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)

    pa, pb = width - mask_a.shape[1], width - mask_b.shape[1]
    for la, lb in zip(cache_a.layers, cache_b.layers):
        la.keys = torch.cat([pad(la.keys, pa, 2), pad(lb.keys, pb, 2)])
        la.values = torch.cat([pad(la.values, pa, 2), pad(lb.values, pb, 2)])
    return cache_a, torch.cat([pad(mask_a, pa, 1), pad(mask_b, pb, 1)])
