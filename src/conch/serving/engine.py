"""The built-in serving engine: one worker thread owns the model and generates for many requests at once.

Continuous batching, the way vLLM and TGI do it, in plain PyTorch on transformers' KV cache:

- requests wait in a bounded queue (full: `QueueFull`, which the server turns into 503);
- between two decoding steps the worker admits waiting requests: it runs their prompts
  (prefill, left-padded) and joins their KV cache to the running batch; a prefill that fails
  fails exactly the requests it was reading, and the batch keeps going;
- every step decodes one token for every running request, each with its own `SamplingParams`
  and its own random generator;
- a request that finishes (end token, stop string, max_tokens), is cancelled (client gone) or
  runs out of time leaves the batch at once, and its rows leave the cache.

The interface the server uses (and a second engine, e.g. vLLM, would implement): ``generate(prompt_ids,
params, timeout_s)`` returns a `Generation`, an async iterator of `Event` s: text pieces (safe to
show: a partial character or a partial stop string is held back), then one `Outcome`.
Underneath, the worker calls each request's one callback, ``on_event``.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from ..chat import GenConfig, eos_ids, sampling_kwargs
from ..reasoning import cut_at_stop, held_back
from .sampling import Detokenizer, SamplingParams, apply_penalties, sample, token_logprobs


class QueueFull(Exception):
    """More requests are waiting than the queue holds."""


@dataclass
class Outcome:
    """How a request ended. ``finish_reason``: stop | length | cancelled | timeout | error | shutdown."""

    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.finish_reason in ("stop", "length")


@dataclass
class Event:
    text: str = ""
    logprobs: list = field(default_factory=list)  # [(token_id, logprob, [(id, logprob), …])] for `text`
    outcome: Outcome | None = None  # set on the last event only


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    timeout_s: float = 120.0
    on_event: Callable[[Event], None] | None = None
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the worker
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    pending_logprobs: list = field(default_factory=list)
    outcome: Outcome | None = None
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    detokenizer: Detokenizer | None = None

    def send(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a listener that went away must not stop the worker
                pass

    def cancel(self) -> None:
        self.cancelled.set()


class TextEngine(Protocol):
    """What the server needs from an engine."""

    queue_depth: int
    active: int
    device: str

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float) -> "Generation": ...

    def sampling_defaults(self, temperature: float | None, top_p: float | None) -> dict: ...

    def shutdown(self) -> None: ...


class Generation:
    """One request's events as an async iterator; ends after the event that carries the `Outcome`."""

    def __init__(self, engine: "Engine", request: Request):
        loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
        self.request = request

        def post(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed
                pass

        request.on_event = post
        self.finished = False  # set when the event with the outcome was handed out (not when the worker sent it)
        engine.add(request)  # QueueFull here, before anything was awaited

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        self.finished = event.outcome is not None
        return event

    def cancel(self) -> None:
        self.request.cancel()


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, start: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = set(eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self._stop = threading.Event()
        self._cache = self._mask = self._lengths = self._next = None
        self.steps = 0
        self.prefilling = 0
        self.worker = threading.Thread(target=self._loop, name="conch-engine", daemon=True)
        if start:  # start=False: the caller drives `admit` and `step` itself (bench/serve_throughput.py)
            self.worker.start()

    # -- public ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float = 120.0) -> Generation:
        return Generation(self, Request(prompt_ids, params, timeout_s))

    def add(self, request: Request) -> Request:
        if self._stop.is_set():
            raise QueueFull("the engine is shutting down")
        if self.waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self.waiting.qsize()} requests are already waiting")
        self.waiting.put(request)
        return request

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def device(self) -> str:
        return str(self.model.device)

    def sampling_defaults(self, temperature: float | None, top_p: float | None) -> dict:
        """Temperature and top_p for a request: the model's generation_config fills in what it left out."""
        return sampling_kwargs(self.model, self.tokenizer, GenConfig(temperature=temperature, top_p=top_p))

    @property
    def active(self) -> int:
        """Requests being generated, including those whose prompt is being read right now."""
        return len(self.running) + self.prefilling

    def shutdown(self, timeout_s: float = 10) -> None:
        """Stop the worker; every request still waiting or running ends as ``cancelled``."""
        self._stop.set()
        if self.worker.is_alive():
            self.worker.join(timeout=timeout_s)
        for r in self.running + self._take(self.waiting.qsize()):
            self._end(r, "shutdown", "the server is shutting down; retry in a moment.")
        self.running, self._cache = [], None

    # -- the worker -----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.running:
                    try:
                        first = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self.admit([first] + self._take(self.max_batch_size - 1))
                elif len(self.running) < self.max_batch_size and not self.waiting.empty():
                    self.admit(self._take(self.max_batch_size - len(self.running)))
                if self.running:
                    self.step()
            except Exception as e:  # a decoding step failed: fail the running requests, keep serving
                for r in self.running:
                    self._end(r, "error", f"generation failed: {type(e).__name__}: {e}")
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
    def admit(self, new: list[Request]) -> None:
        """Prefill the new requests' prompts and join them to the running batch."""
        new = [r for r in new if not self._expired(r)]
        if not new:
            return
        self.prefilling = len(new)
        try:
            self._prefill(new)
        except Exception as e:  # noqa: BLE001 - only these requests fail; the running batch is untouched
            for r in new:
                self._end(r, "error", f"reading the prompt failed: {type(e).__name__}: {e}")
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
        for r in new:
            r.generator = r.params.generator(device)
            r.detokenizer = Detokenizer(self.tokenizer)
        if self.running:
            self._cache, self._mask = _join(self._cache, self._mask, cache, mask)
            self._lengths = torch.cat([self._lengths, lengths])
            self._next = torch.cat([self._next, next_logits])
        else:
            self._cache, self._mask, self._lengths, self._next = cache, mask, lengths, next_logits
        self.running += new

    @torch.inference_mode()
    def step(self) -> None:
        """Sample one token for every running request, then run the model on them."""
        logits = self._next
        penalized = logits
        if any(r.params.penalized for r in self.running):
            penalized = torch.stack([apply_penalties(logits[i], r.params, r.prompt_ids, r.tokens)
                                     if r.params.penalized else logits[i] for i, r in enumerate(self.running)])
        tokens = sample(penalized, [r.params for r in self.running], [r.generator for r in self.running])
        keep = []
        for i, (r, token) in enumerate(zip(self.running, tokens.tolist())):
            if self._expired(r):
                continue
            if r.first_token_at is None:
                r.first_token_at = time.monotonic()
            if token in self.eos:
                if not self._emit(r, r.detokenizer.flush()):  # the held-back characters, then the end
                    self._end(r, "stop")
                continue
            r.tokens.append(token)
            if r.params.logprobs:
                r.pending_logprobs.append((token, *token_logprobs(logits[i], token, r.params.top_logprobs)))
            if self._emit(r, r.detokenizer.add(token)):  # a stop string ended it
                continue
            if len(r.tokens) >= r.params.max_tokens:
                if not self._emit(r, r.detokenizer.flush()):
                    self._end(r, "length")
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

    def _emit(self, r: Request, piece: str) -> bool:
        """Add a decoded piece; send what is safe to show. True when a stop string ended the request."""
        checked, r.text = len(r.text), r.text + piece
        r.text, stopped = cut_at_stop(r.text, r.params.stop, checked)
        if stopped:
            self._end(r, "stop")
            return True
        safe = len(r.text) - held_back(r.text, r.params.stop)
        if safe > r.sent:
            r.send(Event(r.text[r.sent:safe], r.pending_logprobs))
            r.sent, r.pending_logprobs = safe, []
        return False

    def _end(self, r: Request, reason: str, message: str = "") -> None:
        if r.outcome is not None:
            return
        if reason in ("stop", "length") and len(r.text) > r.sent:
            r.send(Event(r.text[r.sent:], r.pending_logprobs))
            r.sent, r.pending_logprobs = len(r.text), []
        r.outcome = Outcome(reason, len(r.prompt_ids), len(r.tokens), message)
        r.send(Event(logprobs=r.pending_logprobs, outcome=r.outcome))

    def _expired(self, r: Request) -> bool:
        if r.cancelled.is_set():
            self._end(r, "cancelled", "the request was cancelled.")
            return True
        if time.monotonic() - r.created > r.timeout_s:
            self._end(r, "timeout", f"the request took longer than its {r.timeout_s:g} s timeout.")
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
