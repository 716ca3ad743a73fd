"""The serving logic between the HTTP routes and the engine (vLLM's ``OpenAIServingChat``, smaller).

`ChatService` owns the config, model, tokenizer, knowledge base and engine:

- `prepare` (a `PromptBuilder`): check the request, retrieve (RAG), render the chat template and
  tokenize, the blocking parts in a worker thread (``asyncio.to_thread``) so no stream stalls meanwhile;
- `submit`: hand it to the engine (a full queue is 503 with Retry-After);
- `complete`: the whole answer, cancelled as soon as the client disconnects;
- `stream`: server-sent events, reasoning and content apart, ending in ``[DONE]``.

The bodies themselves are built in `conch.serving.responses`. How a generation ended is an
`conch.serving.engine.Outcome`, never a string to search: timeout is 504, an engine error 500, the
server shutting down 503, a client that left 499 (`outcome_error`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

from .. import chat
from .engine import Engine, Generation, QueueFull, TextEngine
from ..errors import ConchError
from .metrics import Metrics
from .protocol import APIError, ChatRequest, logprobs_body
from ..reasoning import prompt_opens_think
from .responses import ChunkStream, completion_body, finished_choices, outcome_error, sse
from .sampling import SamplingParams

DEFAULT_ANSWER_TOKENS = 512  # a request without max_tokens: this much answer (plus thinking for R1: chat.budget)


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    opened_think: bool
    sources: list[dict] | None
    n: int = 1
    generations: list[Generation] = field(default_factory=list)
    submitted: float = 0.0


class PromptBuilder:
    """A request's messages and fields to a `Prepared`: the server's limits checked, the sampling
    parameters (``sampling_defaults``, the engine's, fills in temperature and top_p), retrieval, the
    chat template and the token ids."""

    def __init__(self, cfg, tokenizer, knowledge, default_max_tokens: int,
                 sampling_defaults: Callable[[float | None, float | None], dict]):
        self.cfg, self.tokenizer, self.knowledge = cfg, tokenizer, knowledge
        self.default_max_tokens, self.sampling_defaults = default_max_tokens, sampling_defaults
        self.rag_lock = threading.Lock()  # the knowledge base rebuilds its index in place

    async def prepare(self, messages: list[dict], body: ChatRequest) -> Prepared:
        cfg = self.cfg
        if len(messages) > cfg.max_messages:
            raise APIError(400, f"too many messages: {len(messages)}; the limit is {cfg.max_messages}.")
        chars = sum(len(m["content"]) for m in messages)
        if chars > cfg.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters; the limit is {cfg.max_prompt_chars}: "
                                "shorten it or drop earlier messages.")
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages must contain at least one message with role 'user'.")
        max_tokens = body.max_completion_tokens or body.max_tokens or self.default_max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens_limit}.")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings.")
        rag = self.knowledge is not None if body.rag is None else body.rag
        if rag and self.knowledge is None:
            raise APIError(400, "this server has no knowledge folder; start it with --rag_dir data/knowledge "
                                "to use rag, or leave 'rag' out.")
        defaults = self.sampling_defaults(body.temperature, body.top_p)
        params = SamplingParams(max_tokens=max_tokens, temperature=defaults["temperature"] or 0.0,
                                top_p=defaults.get("top_p") or 1.0, frequency_penalty=body.frequency_penalty,
                                presence_penalty=body.presence_penalty, repetition_penalty=body.repetition_penalty,
                                seed=body.seed, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                                stop=stops)
        ids, opened, sources = await asyncio.to_thread(self.render, messages, rag)
        return Prepared(ids, params, opened, sources, body.n)

    def render(self, messages: list[dict], rag: bool) -> tuple[list[int], bool, list[dict] | None]:
        """Blocking: retrieval (hashes the knowledge files), the chat template, the tokenizer."""
        sources = None
        if rag:
            from ..rag import with_context

            try:
                with self.rag_lock:
                    messages, passages = with_context(messages, self.knowledge)
            except ConchError as e:  # e.g. the folder was emptied after startup
                raise APIError(500, str(e), "server_error") from None
            sources = [p.source() for p in passages]
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}] + messages
        prompt = chat.render_prompt(self.tokenizer, messages)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids, prompt_opens_think(prompt), sources


class ChatService:
    def __init__(self, cfg, model, tokenizer, knowledge=None, engine: TextEngine | None = None):
        self.cfg, self.model, self.tokenizer, self.knowledge = cfg, model, tokenizer, knowledge
        self.engine = engine or Engine(model, tokenizer, cfg.max_batch_size, cfg.max_queue)
        # what a request without max_tokens gets: the model's budget (R1 thinks first), within the server's limit
        self.default_max_tokens = min(cfg.default_max_tokens or chat.budget(tokenizer, DEFAULT_ANSWER_TOKENS),
                                      cfg.max_tokens_limit)
        self.prompts = PromptBuilder(cfg, tokenizer, knowledge, self.default_max_tokens,
                                     lambda temperature, top_p: self.engine.sampling_defaults(temperature, top_p))
        self.metrics = Metrics(lambda: self.engine)
        self.started = time.time()

    # -- prepare -------------------------------------------------------------------------------

    async def prepare(self, messages: list[dict], body: ChatRequest) -> Prepared:
        """Check the request, retrieve, render and tokenize (`PromptBuilder.prepare`)."""
        return await self.prompts.prepare(messages, body)

    # -- submit --------------------------------------------------------------------------------
    def submit(self, prepared: Prepared) -> Prepared:
        """Start the request's ``n`` generations (seeds seed, seed+1, … so the choices differ)."""
        prepared.submitted = time.monotonic()
        try:
            for i in range(prepared.n):
                seed = None if prepared.params.seed is None else prepared.params.seed + i
                params = replace(prepared.params, seed=seed)
                prepared.generations.append(self.engine.generate(prepared.prompt_ids, params,
                                                                 self.cfg.request_timeout_s))
        except QueueFull:
            self._cancel(prepared)
            self.metrics.rejected.labels("503").inc()
            raise APIError(503, "the server is busy (request queue full); retry in a few seconds.",
                           "server_busy", {"Retry-After": "2"}) from None
        return prepared

    def _cancel(self, prepared: Prepared) -> None:
        for g in prepared.generations:
            g.cancel()

    def _record(self, gen: Generation) -> None:
        self.metrics.finished(gen.request.outcome, gen.request.created, gen.request.first_token_at, time.monotonic())

    async def _events(self, prepared: Prepared) -> AsyncIterator[tuple[int, object]]:
        """(choice index, event) from all of the request's generations as they come."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen: Generation):
            async for event in gen:
                await merged.put((i, event))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(prepared.generations)]
        try:
            left = len(tasks)
            while left:
                i, event = await merged.get()
                if event.outcome is not None:
                    left -= 1
                    self._record(prepared.generations[i])
                yield i, event
        finally:
            self._cancel(prepared)
            for t in tasks:
                t.cancel()

    # -- complete ------------------------------------------------------------------------------

    async def complete(self, prepared: Prepared, disconnected: Callable[[], Awaitable[bool]]) -> list[dict]:
        """The finished choices: text, reasoning, answer, finish_reason, logprobs; the client is watched."""
        texts, entries, outcomes = [""] * prepared.n, [[] for _ in range(prepared.n)], [None] * prepared.n
        watcher = asyncio.create_task(self._watch(prepared, disconnected))
        events = self._events(prepared)
        try:
            async for i, event in events:
                texts[i] += event.text
                entries[i] += event.logprobs
                outcomes[i] = event.outcome or outcomes[i]
        finally:
            watcher.cancel()
            await events.aclose()
        bad = next((o for o in outcomes if not o.ok), None)
        if bad is not None:
            raise outcome_error(bad)
        return finished_choices(texts, entries, outcomes, prepared.opened_think, self._logprobs_for(prepared))

    async def _watch(self, prepared: Prepared, disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Poll the connection independently of the tokens: a client that left frees its slot at once."""
        while not await disconnected():
            await asyncio.sleep(0.1)
        self._cancel(prepared)

    def _logprobs_for(self, prepared: Prepared) -> Callable[[list], dict] | None:
        """What turns a choice's logprob entries into the body; None when the request asked for none."""
        if not prepared.params.logprobs:
            return None
        return lambda entries: logprobs_body(entries, lambda t: self.tokenizer.decode([t]))

    # -- stream --------------------------------------------------------------------------------

    async def stream(self, prepared: Prepared, body: ChatRequest) -> AsyncIterator[str]:
        """Server-sent events: a first chunk (role; RAG sources), deltas, finish chunks, usage, ``[DONE]``."""
        chunks = ChunkStream(self.cfg.served_model_name, prepared.n, prepared.opened_think,
                             self._logprobs_for(prepared))
        yield sse(chunks.first(prepared.sources))
        events = self._events(prepared)
        try:
            async for i, event in events:
                for piece in chunks.chunks(i, event):
                    yield sse(piece)
                if event.outcome is not None and not event.outcome.ok:
                    return
        finally:
            await events.aclose()
        if body.stream_options and body.stream_options.include_usage:
            yield sse(chunks.usage())
        yield "data: [DONE]\n\n"

    def reply(self, choices: list[dict], sources: list | None) -> dict:
        """The ``chat.completion`` body for finished choices."""
        return completion_body(choices, sources, self.cfg.served_model_name)

    def health(self) -> dict:
        body = {"status": "ok", "model": self.cfg.served_model_name, "device": self.engine.device,
                "queue_depth": self.engine.queue_depth, "running": self.engine.active,
                "uptime_s": round(time.time() - self.started, 1)}
        if self.knowledge is not None:
            body["knowledge"] = self.knowledge.summary()
        return body
