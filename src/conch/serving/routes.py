"""The HTTP routes, as vLLM's ``api_router``: HTTP in, service calls, HTTP out.

``router`` is built once, at import; its handlers find the `ChatService` in ``request.app.state.service``
(set by the app's startup in `conch.serve.create_app`) and the API key in ``request.app.state.api_key``.
Responses are the pydantic models of `conch.serving.protocol` (``response_model``: /docs shows them), and
so are the errors each route can answer (``responses``: `ErrorResponse`, OpenAI's shape, for 4xx and 5xx).
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
import hmac
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from .protocol import (APIError, ChatCompletion, ChatCompletionChunk, ChatRequest, ErrorResponse, GenerateResponse,
                       Health, Message, ModelList)
from .service import ChatService

STATIC = Path(__file__).resolve().parent.parent / "static"

# the streamed answer, documented beside the JSON one (`document_stream` adds the chunk's schema)
STREAM = {200: {"description": "the completion; with `stream: true`, server-sent events of `ChatCompletionChunk`",
                "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}}}}


# the errors a route can answer, documented with their body (the app's exception handlers send `ErrorResponse`)
ERRORS = {400: "the request is invalid or over one of this server's limits; the message names the field",
          401: "missing or wrong API key (a server started with --api_key)",
          500: "the generation failed (or the knowledge folder could not be read)",
          503: "the request queue is full or the server is shutting down; retry after `Retry-After` seconds",
          504: "the request took longer than the server's request timeout"}


def errors(*codes: int) -> dict:
    """``responses`` entries for these error statuses: their description and the `ErrorResponse` body."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


def service(request: Request) -> ChatService:
    return request.app.state.service


async def check_key(request: Request):
    api_key = request.app.state.api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
        raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'.",
                       "authentication_error", {"WWW-Authenticate": "Bearer"})


router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC / "index.html")


@router.get("/health", response_model=Health, response_model_exclude_unset=True)
async def health(request: Request):
    """Liveness and load: the model, the device, requests waiting and running (and the knowledge folder)."""
    return service(request).health()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    metrics = service(request).metrics
    return Response(metrics.render(), media_type=metrics.content_type)


@router.get("/v1/models", dependencies=[Depends(check_key)], response_model=ModelList,
            response_model_exclude_unset=True, responses=errors(401))
async def models(request: Request):
    chat = service(request)
    return {"object": "list", "data": [{"id": chat.cfg.served_model_name, "object": "model",
                                        "created": int(chat.started), "owned_by": "krusty-krab"}]}


@router.get("/generate", dependencies=[Depends(check_key)], response_model=GenerateResponse,
            response_model_exclude_unset=True, responses=errors(400, 401, 500, 503, 504))
async def generate(http: Request, prompt: str = Query(min_length=1, description="the user's question"),
                   max_new_tokens: int | None = Query(None, ge=1),
                   temperature: float | None = Query(None, ge=0, le=2),
                   rag: bool | None = Query(None, description="retrieve first (default: on with --rag_dir)")):
    """The seeds' endpoint, done right: chat template, only the answer, reasoning split off."""
    chat = service(http)
    body = ChatRequest(messages=[Message(role="user", content=prompt)], max_tokens=max_new_tokens,
                       temperature=temperature, rag=rag)
    prepared = chat.submit(await chat.prepare([{"role": "user", "content": prompt}], body))
    choice = (await chat.complete(prepared, http.is_disconnected))[0]
    reply = {"generated_text": choice["answer"], "reasoning": choice["reasoning"],
             "finish_reason": choice["finish_reason"], "usage": chat.reply([choice], None)["usage"]}
    return reply if prepared.sources is None else {**reply, "sources": prepared.sources}


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)], response_model=ChatCompletion,
             response_model_exclude_unset=True, responses={**STREAM, **errors(400, 401, 500, 503, 504)})
async def chat_completions(body: ChatRequest, http: Request):
    chat = service(http)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    prepared = chat.submit(await chat.prepare(messages, body))
    if body.stream:  # a Response goes out as it is: the response model is the non-streamed body's
        return StreamingResponse(chat.stream(prepared, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return chat.reply(await chat.complete(prepared, http.is_disconnected), prepared.sources)


def document_stream(app) -> None:
    """Put `ChatCompletionChunk` (which no route returns as JSON) into the app's OpenAPI components, and take out
    FastAPI's own 422 entries: the app answers a request it cannot validate with a 400 and `ErrorResponse`
    (OpenAI's shape, documented on each route), never with FastAPI's `HTTPValidationError`."""
    build = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = build()
            for methods in schema.get("paths", {}).values():
                for operation in methods.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}")
            found = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in chunk.pop("$defs", {}).items():
                found.setdefault(name, definition)
            found["ChatCompletionChunk"] = chunk
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
