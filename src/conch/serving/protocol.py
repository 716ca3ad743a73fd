"""What goes over the wire: request models, response models and bodies, and the error shape (OpenAI's).

Request models are strict (``"stream": "yes"`` or ``"temperature": "0.5"`` is refused, as
OpenAI's API refuses them) and closed: a field this server does not implement is refused with
400 and a sentence naming it, never silently ignored.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 4  # choices per request

DESCRIPTION = f"""神奇海螺 (the Magic Conch): the Krusty Krab's assistant, OpenAI-compatible.

**POST /v1/chat/completions** implements: `messages` (system / user / assistant; text content or
text parts), `model` (any name), `max_tokens` / `max_completion_tokens`, `temperature` (0 = greedy),
`top_p`, `stop` (up to 4 strings), `seed` (the same seed, the same answer), `n` (up to {MAX_N}),
`frequency_penalty`, `presence_penalty`, `repetition_penalty` (vLLM's), `logprobs` + `top_logprobs`
(up to 20), `stream` + `stream_options.include_usage`, and `rag` (this server's). R1's reasoning comes
back as `reasoning_content` (DeepSeek's name) and `reasoning` (vLLM's), plain and streamed.

**Refused** with 400 and the field's name: every other field, e.g. `tools`, `tool_choice`,
`response_format`, `logit_bias`, `functions`, `user`, `audio`, `modalities`, `reasoning_effort`.
Types are strict: `"stream": "yes"` is a 400, not true.

**GET /generate?prompt=…** is the seeds' endpoint: `generated_text` (the answer only), `reasoning`,
`finish_reason`, `usage`. **GET /metrics** is Prometheus' text format.
"""


class APIError(Exception):
    """An answer with an HTTP status and one sentence; the routes turn it into `error_body`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": status}}


def validation_message(errors: list[dict]) -> str:
    """pydantic's first complaint as one sentence that names the field."""
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query")) or "body"
    if first.get("type") == "extra_forbidden":
        return f"'{where}' is not supported by this server; remove it (/docs lists the supported fields)."
    return f"invalid request: '{where}' {first.get('msg', 'is invalid').lower().rstrip('.')}."


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    rag: bool | None = Field(None, description="retrieve from the knowledge folder first; "
                                                "default: on where the server has one (--rag_dir)")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


# ---------------------------------------------------------------------------------------------
# response models: the routes' ``response_model`` (so /docs shows them), served with
# ``response_model_exclude_unset``: a key the body builders below leave out stays out, a null stays null.
# Fields are in the order the builders write them, so the JSON is the same bytes as the dicts'.


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a key no model names is a 500 in the tests, not a silent loss


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class Logprobs(_Response):
    content: list[TokenLogprob]


class ResponseMessage(_Response):
    role: Literal["assistant"]
    content: str
    reasoning_content: str | None = Field(None, description="R1's reasoning (DeepSeek's name); absent without")
    reasoning: str | None = Field(None, description="the same reasoning (vLLM's name)")


class Choice(_Response):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: Logprobs | None = Field(None, description="with logprobs: true")


class ChatCompletion(_Response):
    """The body of a non-streamed ``POST /v1/chat/completions``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[dict[str, Any]] | None = Field(None, description="RAG mode: the passages retrieved")


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChunkChoice(_Response):
    index: int
    delta: Delta
    finish_reason: str | None
    logprobs: Logprobs | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event (``data: {...}``) of a streamed ``POST /v1/chat/completions``, before ``data: [DONE]``.

    The first chunk carries the role (and RAG's ``sources``); with ``stream_options.include_usage`` the last
    one has no choices and the ``usage``. A generation that fails mid-stream sends ``{"error": {...}}`` and stops.
    """

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    sources: list[dict[str, Any]] | None = None
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Response):
    """``GET /v1/models``: the one model this server serves."""

    object: Literal["list"]
    data: list[ModelCard]


class Health(_Response):
    """``GET /health``: liveness and load."""

    status: str
    model: str
    device: str
    queue_depth: int
    running: int
    uptime_s: float
    knowledge: dict[str, Any] | None = Field(None, description="RAG mode: the knowledge folder's summary")


class GenerateResponse(_Response):
    """``GET /generate``: the seeds' shape (``generated_text``), the answer only, the reasoning split off."""

    generated_text: str
    reasoning: str | None
    finish_reason: str | None
    usage: Usage
    sources: list[dict[str, Any]] | None = Field(None, description="RAG mode: the passages retrieved")


class ErrorDetail(_Response):
    message: str
    type: str
    code: int


class ErrorResponse(_Response):
    """Every error: OpenAI's shape, one sentence in ``message``."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# response bodies


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def message_body(content: str, reasoning: str) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = message["reasoning"] = reasoning
    return message


def completion(cid: str, model: str, choices: list[dict], usage_: dict, sources: list | None) -> dict:
    body = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}
    if sources is not None:
        body["sources"] = sources
    return body


def chunk(cid: str, model: str, choices: list[dict], **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}


def logprobs_body(entries: list, token_text) -> dict:
    """OpenAI's ``logprobs.content`` from the engine's (token, logprob, alternatives) entries."""

    def one(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]}
                        for t, lp, alts in entries]}
