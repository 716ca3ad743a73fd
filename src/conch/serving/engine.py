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

Who does what: `Engine` schedules (the queue, admissions, one step for the whole batch, sampling);
`conch.serving.kv_batch.KVBatch` holds the batch's tensors (KV cache, mask, lengths) and does the
padding, joining and dropping of rows; each `Request` turns its own tokens into text and events.
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
from .kv_batch import KVBatch
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
    """One generation: its prompt and parameters, and (filled in by the worker) its tokens, text and outcome.

    The request turns its own tokens into events (`advance`): the detokenizer, the stop strings,
    what is safe to send yet, and the one `Outcome` (`end`)."""

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

    def advance(self, token: int, logits: torch.Tensor, eos: set[int]) -> bool:
        """Take the token sampled from ``logits``; False when the request has ended (this token ended it,
        or it was cancelled or ran out of time: then the token is not taken)."""
        if self.expired():
            return False
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos:
            if not self.emit(self.detokenizer.flush()):  # the held-back characters, then the end
                self.end("stop")
            return False
        self.tokens.append(token)
        if self.params.logprobs:
            self.pending_logprobs.append((token, *token_logprobs(logits, token, self.params.top_logprobs)))
        if self.emit(self.detokenizer.add(token)):  # a stop string ended it
            return False
        if len(self.tokens) >= self.params.max_tokens:
            if not self.emit(self.detokenizer.flush()):
                self.end("length")
            return False
        return True

    def emit(self, piece: str) -> bool:
        """Add a decoded piece; send what is safe to show. True when a stop string ended the request."""
        checked, self.text = len(self.text), self.text + piece
        self.text, stopped = cut_at_stop(self.text, self.params.stop, checked)
        if stopped:
            self.end("stop")
            return True
        safe = len(self.text) - held_back(self.text, self.params.stop)
        if safe > self.sent:
            self.send(Event(self.text[self.sent:safe], self.pending_logprobs))
            self.sent, self.pending_logprobs = safe, []
        return False

    def end(self, reason: str, message: str = "") -> None:
        """Send the rest of the text (when it ended normally) and the `Outcome`; once only."""
        if self.outcome is not None:
            return
        if reason in ("stop", "length") and len(self.text) > self.sent:
            self.send(Event(self.text[self.sent:], self.pending_logprobs))
            self.sent, self.pending_logprobs = len(self.text), []
        self.outcome = Outcome(reason, len(self.prompt_ids), len(self.tokens), message)
        self.send(Event(logprobs=self.pending_logprobs, outcome=self.outcome))

    def expired(self) -> bool:
        """Cancelled or past its timeout: then it has ended (with that outcome)."""
        if self.cancelled.is_set():
            self.end("cancelled", "the request was cancelled.")
            return True
        if time.monotonic() - self.created > self.timeout_s:
            self.end("timeout", f"the request took longer than its {self.timeout_s:g} s timeout.")
            return True
        return False


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
    """The scheduler: a bounded queue, admissions between steps, one decoding step for the whole batch.

    The batch's tensors are a `conch.serving.kv_batch.KVBatch` (``batch``, None while nothing runs); each
    request turns its own tokens into text and events (`Request.advance`)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_queue: int = 64, start: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.eos = set(eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos))
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []  # in the order of the batch's rows
        self.batch: KVBatch | None = None
        self._stop = threading.Event()
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
            r.end("shutdown", "the server is shutting down; retry in a moment.")
        self.running, self.batch = [], None

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
                    r.end("error", f"generation failed: {type(e).__name__}: {e}")
                self.running, self.batch = [], None

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
        new = [r for r in new if not r.expired()]
        if not new:
            return
        self.prefilling = len(new)
        try:
            self._prefill(new)
        except Exception as e:  # noqa: BLE001 - only these requests fail; the running batch is untouched
            for r in new:
                r.end("error", f"reading the prompt failed: {type(e).__name__}: {e}")
        finally:
            self.prefilling = 0

    def _prefill(self, new: list[Request]) -> None:
        batch = KVBatch.prefill(self.model, [r.prompt_ids for r in new], self.pad_id)
        for r in new:
            r.generator = r.params.generator(self.model.device)
            r.detokenizer = Detokenizer(self.tokenizer)
        if self.running:
            self.batch.join(batch)
        else:
            self.batch = batch
        self.running += new

    @torch.inference_mode()
    def step(self) -> None:
        """Sample one token for every running request, then run the model on them."""
        logits = self.batch.next_logits
        tokens = sample(self._penalized(logits), [r.params for r in self.running], [r.generator for r in self.running])
        keep = [i for i, (r, token) in enumerate(zip(self.running, tokens.tolist()))
                if r.advance(token, logits[i], self.eos)]
        if len(keep) < len(self.running):
            if not keep:
                self.running, self.batch = [], None
                return
            index = torch.tensor(keep, device=self.model.device)
            self.batch.keep(index)
            tokens = tokens[index]
            self.running = [self.running[i] for i in keep]
        self.batch.decode(self.model, tokens)
        self.steps += 1

    def _penalized(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with each request's frequency, presence and repetition penalties (as they are without any)."""
        if not any(r.params.penalized for r in self.running):
            return logits
        return torch.stack([apply_penalties(logits[i], r.params, r.prompt_ids, r.tokens)
                            if r.params.penalized else logits[i] for i, r in enumerate(self.running)])
