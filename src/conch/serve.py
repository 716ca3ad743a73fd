"""Stage 7: serve the model over HTTP with FastAPI.

``python -m conch serve --model outputs/magic_conch_merged`` starts uvicorn with:

- ``GET /generate?prompt=…`` → ``{"generated_text": …}``: the seeds' shape, so their Java
  ``RestTemplate`` caller works unchanged, but with the chat template, only the answer, and the
  reasoning split off into ``reasoning``;
- ``POST /v1/chat/completions``: OpenAI-compatible (`conch.serving.protocol` lists what is supported and
  what is refused), R1's reasoning in ``reasoning_content`` and ``reasoning`` beside ``content``;
- ``GET /v1/models``, ``GET /health`` (model, device, queue depth), ``GET /metrics``
  (Prometheus), ``/docs``;
- ``GET /``: a chat page (plain HTML/JS) that streams answers and folds the reasoning away.

RAG mode (``--rag_dir data/knowledge``, see `conch.rag`): the server retrieves passages with the
conversation (the last three user messages, the latest counted twice, so that a follow-up such as
"那它多少钱？" finds what the earlier question was about) and puts them in front of the last
question; the answer carries a top-level
``sources`` list (in the first chunk when streamed). ``"rag": false`` switches it off per request.

The layers, as in vLLM's server: `conch.serving.protocol` (what goes over the wire), `conch.serving.service`
(prepare, submit, complete, stream), `conch.serving.engine` (continuous batching), the routes
(`conch.serving.routes`: HTTP in, service calls, HTTP out) and `conch.serving.launch` (a server in a child process).
"""

import os
import signal
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConchError
from .serving.launch import BackgroundServer, tunnel_command, wait_until_healthy  # noqa: F401 - public here too
from .serving.protocol import APIError
from .reasoning import ThinkSplitter  # noqa: F401 - public here too


@dataclass
class ServeConfig:
    model: str = "outputs/magic_conch_merged"  # a merged folder, or a base (auto | demo | id | folder)
    adapter: str | None = None  # a LoRA adapter to put on top of `model` (no merge needed)
    served_model_name: str = "magic-conch"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # or env CONCH_API_KEY; None: no auth (refused beyond loopback unless insecure)
    insecure: bool = False  # serve a host beyond loopback without an API key, knowingly
    cors_origins: list[str] = field(default_factory=list)  # e.g. ["http://localhost:5173"]
    max_batch_size: int = 16
    max_queue: int = 64
    request_timeout_s: float = 120.0
    shutdown_drain_s: float = 10.0  # on SIGTERM: how long requests in flight may finish before they are cancelled
    max_prompt_chars: int = 8000
    max_messages: int = 64
    max_tokens_limit: int = 2048
    default_max_tokens: int | None = None  # None: 512 + chat.THINK_TOKENS for a reasoning model
    system_prompt: str | None = None  # added when a request has no system message
    rag_dir: str | None = None  # a knowledge folder (e.g. data/knowledge): retrieve before answering
    rag_top_k: int = 3  # passages retrieved per question in RAG mode
    engine: str = "builtin"  # builtin (the teaching engine) | vllm (conch.serving.engine_vllm, in .venv-vllm)
    vllm_compile: bool = False  # --engine vllm on a CPU: torch.compile the model (vLLM's default; minutes to start)


def create_app(cfg: ServeConfig, model=None, tokenizer=None, knowledge=None):
    """The FastAPI app; loads the model at startup unless ``model`` and ``tokenizer`` are given.

    ``knowledge``: a ready `conch.rag.KnowledgeBase`; by default one is built from ``cfg.rag_dir``.
    The app only assembles: the routes are `conch.serving.routes.router`, which read what the startup
    puts in ``app.state`` (``service``, the `ChatService`; ``api_key``).
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import chat
    from .serving.protocol import DESCRIPTION, error_body, validation_message
    from .serving.routes import document_stream, router
    from .serving.service import ChatService

    @asynccontextmanager
    async def lifespan(app):
        kb = knowledge if knowledge is not None else open_knowledge(cfg)
        if cfg.engine == "vllm" and model is None:  # vLLM loads the weights itself: only the tokenizer here
            from .serving.engine_vllm import start

            tok, engine = start(cfg)
            app.state.service = ChatService(cfg, None, tok, kb, engine=engine)
        else:
            m, t = (model, tokenizer) if model is not None else chat.load(cfg.model, cfg.adapter)
            app.state.service = ChatService(cfg, m, t, kb)
        yield
        app.state.service.engine.shutdown()

    app = FastAPI(title="Magic Conch API", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.api_key = cfg.api_key or os.environ.get("CONCH_API_KEY") or None
    app.state.stop_engine = lambda: (app.state.service.engine.shutdown()
                                     if getattr(app.state, "service", None) is not None else None)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])  # a page backs off as the server asks

    def error(status, message, kind="invalid_request_error", headers=None):
        service = getattr(app.state, "service", None)
        if service is not None and status != 503:  # 503s are counted where they happen
            service.metrics.rejected.labels(str(status)).inc()
        return JSONResponse(error_body(status, message, kind), status, headers=headers)

    @app.exception_handler(APIError)
    async def on_api_error(request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc: RequestValidationError):
        return error(400, validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, exc):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "error")

    @app.exception_handler(Exception)
    async def on_crash(request, exc):
        return error(500, "internal server error; the server log has the details.", "server_error")

    app.include_router(router)
    document_stream(app)
    return app


def open_knowledge(cfg: ServeConfig):
    """The knowledge base for RAG mode, or None without ``rag_dir``; a bad folder is a `ConchError`."""
    if not cfg.rag_dir:
        return None
    from .rag import KnowledgeBase, RagConfig

    return KnowledgeBase(RagConfig(knowledge_dir=cfg.rag_dir, top_k=cfg.rag_top_k))


def _exit_now(*_) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach: 127.0.0.0/8, ::1 and localhost."""
    import ipaddress

    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name (or "" = every interface): reachable from elsewhere
        return False


def check_config(cfg: ServeConfig) -> None:
    """What `serve` refuses before it loads anything: an open host without an API key, an unknown engine.

    A host beyond loopback (``--host 0.0.0.0``, a LAN address, a host name) needs an API key
    (``--api_key`` or ``$CONCH_API_KEY``), or ``--insecure`` to serve without one on purpose
    (then a one-line warning on stderr).
    """
    has_key = bool(cfg.api_key or os.environ.get("CONCH_API_KEY"))
    if not is_loopback(cfg.host) and not has_key:
        if not cfg.insecure:
            raise ConchError(f"--host {cfg.host} lets other machines reach the server, so it needs an API key: "
                             "run `export CONCH_API_KEY=<a long random string>` (or pass --api_key <key>) and send "
                             "'Authorization: Bearer <key>', or pass --insecure to serve without one.")
        print(f"warning: serving on {cfg.host}:{cfg.port} without an API key (--insecure): anyone who can reach "
              "this port can use the model.", file=sys.stderr, flush=True)
    check_engine(cfg)


def check_engine(cfg: ServeConfig) -> None:
    """An unknown engine, or vLLM where it is not installed, stops here in one sentence."""
    if cfg.engine not in ("builtin", "vllm"):
        raise ConchError(f"engine '{cfg.engine}' is unknown; use --engine builtin (the teaching engine) "
                         "or --engine vllm (vLLM, installed by `make vllm`).")
    if cfg.engine == "vllm":
        from .serving.engine_vllm import require_vllm

        require_vllm()
        if cfg.adapter:
            raise ConchError("--adapter is not supported with --engine vllm; merge first (python -m conch merge) "
                             "and serve the merged folder.")
    elif cfg.vllm_compile:
        raise ConchError("--vllm_compile applies to --engine vllm only; drop it or add --engine vllm.")


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    check_config(cfg)
    if not (Path(cfg.model).is_dir() or cfg.model in ("auto", "demo") or cfg.model.count("/") == 1):
        raise ConchError(f"model {cfg.model} does not exist; merge first (python -m conch merge) or pass "
                         "--model demo / a base model with --adapter.")
    knowledge = open_knowledge(cfg)  # a missing or empty folder stops here, in one sentence
    print(f"serving {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "") +
          f" as '{cfg.served_model_name}' on http://{cfg.host}:{cfg.port} (docs: /docs, chat page: /)"
          + ("; API key required" if (cfg.api_key or os.environ.get("CONCH_API_KEY")) else "")
          + (f"; RAG over {knowledge.summary()['files']} files in {cfg.rag_dir}" if knowledge else ""), flush=True)
    print(f"on a remote machine, {tunnel_command(cfg.port)}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT (the drain, then the lifespan's shutdown), then
    # re-raises the signal with the handler it found installed: make that handler a clean, immediate
    # exit (code 0). Everything is shut down by then; the interpreter's own teardown (garbage-collecting
    # the torch/transformers heap) took another 9-27 s on a busy 2-core machine, so skip it.
    signal.signal(signal.SIGTERM, _exit_now)
    app = create_app(cfg, knowledge=knowledge)
    # the drain: on SIGTERM, requests still running after shutdown_drain_s end with 503 ("shutting
    # down"); uvicorn's own timeout cancels whatever is left a few seconds later
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                           timeout_graceful_shutdown=cfg.shutdown_drain_s + 5))
    handle_exit = server.handle_exit

    def on_signal(sig, frame):
        if not server.should_exit:
            drain = threading.Timer(cfg.shutdown_drain_s, app.state.stop_engine)
            drain.daemon = True
            drain.start()
        handle_exit(sig, frame)

    server.handle_exit = on_signal
    server.run()
