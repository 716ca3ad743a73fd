"""Response assembly for `conch.serving.service.ChatService`: the engine's events in, OpenAI's bodies out.

- `outcome_error`: the HTTP error for a generation that did not end normally (from its `Outcome`'s
  finish_reason, never its words: timeout 504, engine error 500, shutdown 503, client gone 499);
- `finished_choices` and `completion_body`: the whole answer (``chat.completion``);
- `ChunkStream`: one streamed answer's chunks (``chat.completion.chunk``), reasoning and content apart.

No engine, no HTTP: what to send, not when.
"""

from __future__ import annotations

import json
import uuid
from typing import Callable

from .protocol import APIError, chunk, completion, message_body, usage
from ..reasoning import ReasoningStream, split_reasoning

STATUS = {"timeout": 504, "error": 500, "shutdown": 503, "cancelled": 499}


def outcome_error(outcome) -> APIError:
    """The HTTP error for a generation that did not end normally."""
    status = STATUS[outcome.finish_reason]
    return APIError(status, outcome.message or "the request did not finish.",
                    "invalid_request_error" if status == 499 else "server_error",
                    {"Retry-After": "2"} if status == 503 else None)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def sse(data: dict) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(data, ensure_ascii=False) + "\n\n"


def finished_choices(texts: list[str], entries: list[list], outcomes: list, opened_think: bool,
                     logprobs: Callable[[list], dict] | None) -> list[dict]:
    """The choices of a whole answer: text, reasoning, answer, finish_reason, outcome, logprobs
    (``logprobs`` turns a choice's entries into the body; None: the request asked for none)."""
    choices = []
    for i, (text, outcome) in enumerate(zip(texts, outcomes)):
        reasoning, answer = split_reasoning(text, opened_think)
        choices.append({"index": i, "text": text, "reasoning": reasoning, "answer": answer,
                        "finish_reason": outcome.finish_reason, "outcome": outcome,
                        "logprobs": logprobs(entries[i]) if logprobs is not None else None})
    return choices


def completion_body(choices: list[dict], sources: list | None, model: str) -> dict:
    """The ``chat.completion`` body for finished choices."""
    out = []
    for c in choices:
        choice = {"index": c["index"], "message": message_body(c["answer"], c["reasoning"]),
                  "finish_reason": c["finish_reason"]}
        if c["logprobs"] is not None:
            choice["logprobs"] = c["logprobs"]
        out.append(choice)
    prompt = choices[0]["outcome"].prompt_tokens
    used = usage(prompt, sum(c["outcome"].completion_tokens for c in choices))
    return completion(completion_id(), model, out, used, sources)


class ChunkStream:
    """The chunks of one streamed answer with ``n`` choices: `first`, then `chunks` for each engine
    event, then (when asked for) `usage`. ``logprobs`` as in `finished_choices`."""

    def __init__(self, model: str, n: int, opened_think: bool, logprobs: Callable[[list], dict] | None):
        self.id, self.model, self.n, self.logprobs = completion_id(), model, n, logprobs
        self.splitters = [ReasoningStream(opened_think) for _ in range(n)]
        self.prompt_tokens = self.completion_tokens = 0  # of the finished choices

    def first(self, sources: list | None) -> dict:
        """The role of every choice (and the RAG sources)."""
        extra = {} if sources is None else {"sources": sources}
        return chunk(self.id, self.model, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None} for i in range(self.n)], **extra)

    def chunks(self, i: int, event) -> list[dict]:
        """The chunks for one engine event of choice ``i``; a failed outcome is one error body instead."""
        outcome, out = event.outcome, []
        if outcome is not None and not outcome.ok:
            error = outcome_error(outcome)
            return [{"error": {"message": error.message, "type": error.kind, "code": error.status}}]
        reasoning, content = self.splitters[i].feed(event.text, final=outcome is not None)
        delta = {}
        if reasoning:
            delta["reasoning_content"] = delta["reasoning"] = reasoning
        if content:
            delta["content"] = content
        if delta or event.logprobs:
            choice = {"index": i, "delta": delta, "finish_reason": None}
            if self.logprobs is not None:
                choice["logprobs"] = self.logprobs(event.logprobs)
            out.append(chunk(self.id, self.model, [choice]))
        if outcome is not None:
            out.append(chunk(self.id, self.model, [{"index": i, "delta": {}, "finish_reason": outcome.finish_reason}]))
            self.prompt_tokens = outcome.prompt_tokens
            self.completion_tokens += outcome.completion_tokens
        return out

    def usage(self) -> dict:
        """The last chunk with ``stream_options.include_usage``: no choices, the finished choices' tokens."""
        return chunk(self.id, self.model, [], usage=usage(self.prompt_tokens, self.completion_tokens))
