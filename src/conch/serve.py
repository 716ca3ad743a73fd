"""Stage 7: serve the model over HTTP with FastAPI.

``python -m conch serve --model outputs/magic_conch_merged`` starts uvicorn with:

- ``GET /generate?prompt=…`` → ``{"generated_text": …}``: the seeds' shape, so their Java
  ``RestTemplate`` caller works unchanged, but with the chat template, only the answer, and the
  reasoning split off into ``reasoning``;
- ``POST /v1/chat/completions``: OpenAI-compatible (messages, temperature, top_p, max_tokens,
  stop, ``stream: true`` as server-sent events ending in ``[DONE]``), R1's reasoning in
  ``reasoning_content`` beside ``content`` the way DeepSeek's own API returns it;
- ``GET /v1/models``, ``GET /health`` (model, device, queue depth), ``/docs``;
- ``GET /``: a chat page (plain HTML/JS) that streams answers and folds the reasoning away.

RAG mode (``--rag_dir data/knowledge``, see `conch.rag`): before generating, the server retrieves
passages for the last user message from that folder's files and puts them in front of the question;
the answer then carries a top-level ``sources`` list (file, heading, chunk_id, score, text snippet)
beside the usual fields; a streamed answer carries it in its first chunk. A request can switch
retrieval off with ``"rag": false`` (``rag=false`` on ``/generate``), or on with ``true`` where the
server has a knowledge folder. The index follows edits to the files without a restart.

All requests go to one `Engine` (continuous batching). A full queue answers 503 with
Retry-After; a client that disconnects stops its generation; every request has a timeout.
With ``api_key`` set (or ``CONCH_API_KEY``), the API needs ``Authorization: Bearer <key>``.
Bad input is answered 4xx with one sentence; no response ever carries a stack trace.
"""

# no `from __future__ import annotations` here: FastAPI reads the annotations of the endpoints
# defined inside create_app, which strings would hide from it
import asyncio
import atexit
import hmac
import json
import os
import signal
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import ConchError

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    model: str = "outputs/magic_conch_merged"  # a merged folder, or a base (auto | demo | id | folder)
    adapter: str | None = None  # a LoRA adapter to put on top of `model` (no merge needed)
    served_model_name: str = "magic-conch"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # or env CONCH_API_KEY; None: no auth
    cors_origins: list[str] = field(default_factory=list)  # e.g. ["http://localhost:5173"]
    max_batch_size: int = 16
    max_queue: int = 64
    request_timeout_s: float = 120.0
    max_prompt_chars: int = 8000
    max_messages: int = 64
    max_tokens_limit: int = 2048
    default_max_tokens: int = 512
    system_prompt: str | None = None  # added when a request has no system message
    rag_dir: str | None = None  # a knowledge folder (e.g. data/knowledge): retrieve before answering
    rag_top_k: int = 3  # passages retrieved per question in RAG mode


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


# ---------------------------------------------------------------------------------------------
# streaming think split


class ThinkSplitter:
    """Route streamed text to reasoning or content; a tag split across pieces is held back."""

    def __init__(self, prompt_opened_think: bool):
        self.in_think = prompt_opened_think
        self.started = False
        self.buffer = ""
        self.trim = {"reasoning": _Trim(), "content": _Trim()}

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        """The next (reasoning, content) pieces, whitespace-trimmed at both ends like `split_reasoning`."""
        reasoning, content = self._route(piece, final)
        return self.trim["reasoning"].feed(reasoning, final), self.trim["content"].feed(content, final)

    def _route(self, piece: str, final: bool) -> tuple[str, str]:
        from .chat import THINK_CLOSE, THINK_OPEN

        self.buffer += piece
        reasoning = content = ""
        while self.buffer:
            if not self.started:
                stripped = self.buffer.lstrip()
                if THINK_OPEN.startswith(stripped) and not final and len(stripped) < len(THINK_OPEN):
                    return reasoning, content  # could still become <think>
                if stripped.startswith(THINK_OPEN):
                    self.in_think, self.buffer = True, stripped[len(THINK_OPEN):]
                self.started = True
                continue
            if not self.in_think:
                content, self.buffer = content + self.buffer, ""
                break
            if THINK_CLOSE in self.buffer:
                before, self.buffer = self.buffer.split(THINK_CLOSE, 1)
                reasoning += before
                self.in_think = False
                self.buffer = self.buffer.lstrip("\n")
                continue
            keep = 0 if final else next((k for k in range(len(THINK_CLOSE) - 1, 0, -1)
                                         if self.buffer.endswith(THINK_CLOSE[:k])), 0)
            reasoning += self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return reasoning, content


class _Trim:
    """Drops leading whitespace and holds trailing whitespace back until more text follows."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, text: str, final: bool) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.pending + text
        body = text.rstrip()
        self.pending = "" if final else text[len(body):]
        return body


# ---------------------------------------------------------------------------------------------
# the app


def create_app(cfg: ServeConfig, model=None, tokenizer=None, knowledge=None):
    """The FastAPI app; loads the model at startup unless ``model`` and ``tokenizer`` are given.

    ``knowledge``: a ready `conch.rag.KnowledgeBase`; by default one is built from ``cfg.rag_dir``.
    """
    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import chat
    from .engine import Engine, QueueFull
    from .engine import Request as EngineRequest

    api_key = cfg.api_key or os.environ.get("CONCH_API_KEY") or None
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["knowledge"] = knowledge if knowledge is not None else open_knowledge(cfg)
        m, t = model, tokenizer
        if m is None:
            m, t = chat.load(cfg.model, cfg.adapter)
        state.update(model=m, tokenizer=t, device=str(m.device),
                     engine=Engine(m, t, cfg.max_batch_size, cfg.max_queue), started=time.time())
        yield
        state["engine"].shutdown()

    app = FastAPI(title="Magic Conch API", version="1.0",
                  description="神奇海螺: the Krusty Krab's assistant, OpenAI-compatible.", lifespan=lifespan)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    # -- errors: one sentence, OpenAI's error shape, never a traceback -----------------------

    def error(status, message, kind="invalid_request_error", headers=None):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
        return error(400, f"invalid request: '{where or 'body'}' {first.get('msg', 'is invalid').lower()}.")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        return error(500, "internal server error; the server log has the details.", "server_error")

    async def check_key(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'.",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    # -- request shapes ----------------------------------------------------------------------

    class TextPart(BaseModel):
        type: Literal["text"] = "text"
        text: str

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str | list[TextPart]

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatRequest(BaseModel):
        messages: list[Message] = Field(min_length=1)
        model: str | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: int = Field(1, ge=1, le=1)
        seed: int | None = None
        rag: bool | None = Field(None, description="retrieve from the knowledge folder first; "
                                                    "default: on where the server has one (--rag_dir)")

    # -- helpers -------------------------------------------------------------------------------

    def engine() -> Engine:
        return state["engine"]

    def retrieve(messages: list[dict], rag: bool | None) -> tuple[list[dict], list[dict] | None]:
        """RAG mode: the messages with passages before the last question, and their sources (None: no RAG)."""
        from .rag import with_context

        kb = state["knowledge"]
        if rag is None:
            rag = kb is not None
        if not rag:
            return messages, None
        if kb is None:
            raise APIError(400, "this server has no knowledge folder; start it with --rag_dir data/knowledge "
                                "to use rag, or leave 'rag' out.")
        try:
            messages, passages = with_context(messages, kb)
        except ConchError as e:  # e.g. the folder was emptied after startup
            raise APIError(500, str(e), "server_error") from None
        return messages, [p.source() for p in passages]

    def prepare(messages: list[dict], max_tokens, temperature, top_p, stop,
                rag: bool | None = None) -> tuple[EngineRequest, bool, list[dict] | None]:
        tok = state["tokenizer"]
        if len(messages) > cfg.max_messages:
            raise APIError(400, f"too many messages: {len(messages)}; the limit is {cfg.max_messages}.")
        chars = sum(len(m["content"]) for m in messages)
        if chars > cfg.max_prompt_chars:
            raise APIError(400, f"the prompt is {chars} characters; the limit is {cfg.max_prompt_chars}: "
                                "shorten it or drop earlier messages.")
        if not any(m["role"] == "user" for m in messages):
            raise APIError(400, "messages must contain at least one message with role 'user'.")
        messages, sources = retrieve(messages, rag)
        if cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": cfg.system_prompt}] + messages
        max_tokens = max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_limit)
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_tokens_limit}.")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings.")
        sampling = chat.sampling_kwargs(state["model"], chat.GenConfig(temperature=temperature, top_p=top_p))
        prompt = chat.render_prompt(tok, messages)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        request = EngineRequest(ids, max_tokens=max_tokens, temperature=sampling["temperature"] or 0.0,
                                top_p=sampling.get("top_p") or 1.0, stop=stops, timeout_s=cfg.request_timeout_s)
        return request, chat.prompt_opens_think(prompt), sources

    def submit(request: EngineRequest) -> EngineRequest:
        loop, inbox = asyncio.get_running_loop(), asyncio.Queue()
        request.inbox = inbox
        request.listener = lambda event: loop.call_soon_threadsafe(inbox.put_nowait, event)
        try:
            return engine().submit(request)
        except QueueFull:
            raise APIError(503, "the server is busy (request queue full); retry in a few seconds.",
                           "server_busy", {"Retry-After": "2"}) from None

    async def next_event(req: EngineRequest, http: Request):
        """The next engine event; cancels the generation when the client has gone away."""
        while True:
            try:
                return await asyncio.wait_for(req.inbox.get(), 0.5)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    req.cancel()
                    return ("gone", None)

    async def complete(req: EngineRequest, http: Request) -> str:
        text = ""
        while True:
            kind, value = await next_event(req, http)
            if kind == "delta":
                text += value
            elif kind == "done":
                return text
            elif kind == "gone":
                raise APIError(499, "client closed the request.")
            else:
                raise APIError(504 if "timeout" in value else 500, value, "server_error")

    def usage(req: EngineRequest) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.tokens),
                "total_tokens": len(req.prompt_ids) + len(req.tokens)}

    def as_messages(body: ChatRequest) -> list[dict]:
        return [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(p.text for p in m.content)} for m in body.messages]

    # -- endpoints -----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        """Liveness and load: the model, the device, requests waiting and running (and the knowledge folder)."""
        body = {"status": "ok", "model": cfg.served_model_name, "device": state["device"],
                "queue_depth": engine().queue_depth, "running": engine().active,
                "uptime_s": round(time.time() - state["started"], 1)}
        if state["knowledge"] is not None:
            body["knowledge"] = state["knowledge"].summary()
        return body

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model",
                                            "created": int(state["started"]), "owned_by": "krusty-krab"}]}

    @app.get("/generate", dependencies=[Depends(check_key)])
    async def generate(http: Request, prompt: str = Query(min_length=1, description="the user's question"),
                       max_new_tokens: int | None = Query(None, ge=1),
                       temperature: float | None = Query(None, ge=0, le=2),
                       rag: bool | None = Query(None, description="retrieve first (default: on with --rag_dir)")):
        """The seeds' endpoint, done right: chat template, only the answer, reasoning split off."""
        req, opened, sources = prepare([{"role": "user", "content": prompt}], max_new_tokens, temperature,
                                       None, None, rag)
        text = await complete(submit(req), http)
        reasoning, answer = chat.split_reasoning(text, opened)
        body = {"generated_text": answer, "reasoning": reasoning, "finish_reason": req.finish_reason,
                "usage": usage(req)}
        if sources is not None:
            body["sources"] = sources
        return body

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, http: Request):
        req, opened, sources = prepare(as_messages(body), body.max_completion_tokens or body.max_tokens,
                                       body.temperature, body.top_p, body.stop, body.rag)
        if body.seed is not None and req.temperature > 0:
            engine().generator.manual_seed(body.seed)
        submit(req)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), cfg.served_model_name
        if not body.stream:
            text = await complete(req, http)
            reasoning, answer = chat.split_reasoning(text, opened)
            message = {"role": "assistant", "content": answer}
            if reasoning:
                message["reasoning_content"] = reasoning
            reply = {"id": cid, "object": "chat.completion", "created": created, "model": name,
                     "choices": [{"index": 0, "message": message, "finish_reason": req.finish_reason}],
                     "usage": usage(req)}
            if sources is not None:
                reply["sources"] = sources
            return reply

        def chunk(delta: dict, finish=None, **extra) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": name, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}], **extra},
                                         ensure_ascii=False) + "\n\n"

        async def events():
            splitter = ThinkSplitter(opened)
            try:
                # RAG mode: the sources come first, so a page can show them while the answer streams
                yield chunk({"role": "assistant", "content": ""}, **({} if sources is None else {"sources": sources}))
                while True:
                    kind, value = await next_event(req, http)
                    if kind == "gone":
                        return
                    if kind == "error":
                        yield "data: " + json.dumps({"error": {"message": value, "type": "server_error"}}) + "\n\n"
                        break
                    reasoning, content = splitter.feed(value if kind == "delta" else "", final=kind == "done")
                    if reasoning:
                        yield chunk({"reasoning_content": reasoning})
                    if content:
                        yield chunk({"content": content})
                    if kind == "done":
                        yield chunk({}, req.finish_reason)
                        if body.stream_options and body.stream_options.include_usage:
                            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk",
                                                         "created": created, "model": name, "choices": [],
                                                         "usage": usage(req)}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                req.cancel()  # the client went away mid-stream: stop generating for it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def open_knowledge(cfg: ServeConfig):
    """The knowledge base for RAG mode, or None without ``rag_dir``; a bad folder is a `ConchError`."""
    if not cfg.rag_dir:
        return None
    from .rag import KnowledgeBase, RagConfig

    return KnowledgeBase(RagConfig(knowledge_dir=cfg.rag_dir, top_k=cfg.rag_top_k))


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve until interrupted (Ctrl-C)."""
    import uvicorn

    if not (Path(cfg.model).is_dir() or cfg.model in ("auto", "demo") or cfg.model.count("/") == 1):
        raise ConchError(f"model {cfg.model} does not exist; merge first (python -m conch merge) or pass "
                         "--model demo / a base model with --adapter.")
    knowledge = open_knowledge(cfg)  # a missing or empty folder stops here, in one sentence
    print(f"serving {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "") +
          f" as '{cfg.served_model_name}' on http://{cfg.host}:{cfg.port} (docs: /docs, chat page: /)"
          + ("; API key required" if (cfg.api_key or os.environ.get("CONCH_API_KEY")) else "")
          + (f"; RAG over {knowledge.summary()['files']} files in {cfg.rag_dir}" if knowledge else ""), flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the handler it
    # found installed: make that handler a clean exit, so `kill` / Ctrl-C end with exit code 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(cfg, knowledge=knowledge), host=cfg.host, port=cfg.port, log_level="info")


def wait_until_healthy(url: str, process, timeout_s: float) -> str:
    """Poll ``url/health`` until it answers 200 ("ready"), the process ends ("exited") or time runs out ("timeout")."""
    import httpx

    deadline = time.time() + timeout_s
    while True:
        if process.poll() is not None:
            return "exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            return "timeout"
        time.sleep(0.3)


class BackgroundServer:
    """``python -m conch serve`` in a child process on a free local port (notebooks, make run, tests).

        with BackgroundServer("outputs/magic_conch_merged") as server:
            print(server.url)          # http://127.0.0.1:<port>

    ``start()`` waits until ``/health`` answers; ``stop()`` sends SIGTERM, so uvicorn finishes the
    requests in flight and runs the shutdown, and returns the exit code.
    """

    def __init__(self, model: str | Path, *args: str, port: int | None = None, env: dict | None = None,
                 startup_timeout_s: float = 180, log: str | Path | None = None):
        self.model, self.args, self.env = str(model), [str(a) for a in args], env or {}
        self.port, self.timeout, self.log = port, startup_timeout_s, log
        self.process = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ConchError("the server has no port yet; call start() first (or use it in a `with` block).")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "BackgroundServer":
        import socket
        import subprocess
        import sys

        if self.port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "conch", "serve", "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        if self.log:
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "w") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        atexit.register(self.stop)  # a notebook kernel that dies must not leave the server behind
        status = wait_until_healthy(self.url, self.process, self.timeout)
        if status == "exited":
            detail = Path(self.log).read_text()[-2000:] if self.log else "(pass log=... to keep its output)"
            raise ConchError(f"the server exited with code {self.process.returncode} before it was ready: "
                             f"{detail.strip().splitlines()[-1] if detail.strip() else 'no output'}")
        if status == "timeout":
            self.stop()
            raise ConchError(f"the server did not answer /health within {self.timeout:g} s.")
        return self

    def stop(self) -> int | None:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
