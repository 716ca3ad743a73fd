"""Serving on vLLM: the field's engine behind the same interface as the built-in `conch.serving.engine`.

``conch serve --engine vllm`` puts vLLM's `AsyncLLM` (paged KV cache, chunked prefill, CUDA graphs
on a GPU, its own CPU kernels here) under the same routes, limits, auth, RAG and reasoning split:
the service renders and tokenizes the prompt as always and hands the token ids to vLLM.

- ``generate(prompt_ids, params, timeout_s)`` returns a `Generation`: vLLM's ``generate()``
  runs in a task, its text deltas arrive as `conch.serving.engine.Event` s, then one `Outcome`;
- cancelling (the client left) and the request timeout cancel that task, and vLLM's
  ``generate()`` aborts the request in the engine (``AsyncLLM.abort``);
- the queue limit is the built-in engine's: ``max_batch_size`` requests run (vLLM's
  ``max_num_seqs``), ``max_queue`` more may wait, the next one is `QueueFull` (503);
- sampling defaults for what a request leaves out follow `conch.chat.model_sampling`, as the built-in
  engine's do (the model's generation_config where it samples, R1's 0.6 / 0.95, else greedy), so one
  request answers alike on both; top_k, min_p and repetition_penalty come from the file as vLLM reads it.

vLLM pins its own torch and transformers, so it lives in its own environment: ``make vllm``
builds ``.venv-vllm``. Only this module imports vllm. On a CPU, ``CONCH_THREADS`` (or vLLM's own
``VLLM_CPU_OMP_THREADS_BIND``) sets the threads, and ``VLLM_CPU_KVCACHE_SPACE`` the KV cache in GiB
(default here: 2).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import model_sampling
from .engine import Event, Outcome, QueueFull
from ..errors import ConchError
from ..reasoning import is_reasoning_model
from .sampling import SamplingParams

MISSING = ("vLLM is not installed in this environment; run `make vllm` and start the server with "
           ".venv-vllm/bin/conch serve --engine vllm ...")
MAX_MODEL_LEN = 16384  # enough for --max_prompt_chars, RAG passages and --max_tokens_limit; saves KV memory


def require_vllm() -> None:
    """Stop with one sentence when vllm cannot be imported here."""
    if importlib.util.find_spec("vllm") is None:
        raise ConchError(MISSING)


@dataclass
class Request:
    """What the service reads about a generation (the built-in engine's `Request` has the same fields)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    timeout_s: float
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    outcome: Outcome | None = None
    completion_tokens: int = 0


class Generation:
    """One request's events as an async iterator, like `conch.serving.engine.Generation`."""

    def __init__(self, engine: "VLLMEngine", request: Request):
        self.request, self._engine = request, engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._timed_out = False
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._timer = loop.call_later(request.timeout_s, self._time_out)
        self._task.add_done_callback(self._finished)  # also when cancelled before it ever ran

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.request.outcome is not None and self._queue.empty():
            raise StopAsyncIteration
        return await self._queue.get()

    def cancel(self) -> None:
        self._task.cancel()

    def _time_out(self) -> None:
        self._timed_out = True
        self._task.cancel()

    def _end(self, reason: str, message: str = "", logprobs: list | None = None) -> None:
        r = self.request
        if r.outcome is None:
            r.outcome = Outcome(reason, len(r.prompt_ids), r.completion_tokens, message)
            self._queue.put_nowait(Event(logprobs=logprobs or [], outcome=r.outcome))

    def _finished(self, task) -> None:
        self._timer.cancel()
        self._engine.running.discard(self)
        if self.request.outcome is None:  # cancelled before vLLM saw it
            self._cancelled()

    def _cancelled(self) -> None:
        if self._timed_out:
            self._end("timeout", f"the request took longer than its {self.request.timeout_s:g} s timeout.")
        elif self._engine.closing:
            self._end("shutdown", "the server is shutting down; retry in a moment.")
        else:
            self._end("cancelled", "the request was cancelled.")

    async def _run(self) -> None:
        r, engine = self.request, self._engine
        try:
            # cancelling this task (client gone, timeout, shutdown) makes vLLM's generate() abort the request
            async for out in engine.llm.generate({"prompt_token_ids": r.prompt_ids},
                                                 engine.sampling_params(r.params), r.id):
                self._emit(out.outputs[0])
        except asyncio.CancelledError:
            self._cancelled()
        except Exception as e:  # noqa: BLE001 - one request fails, the server keeps serving
            self._end("error", f"generation failed: {type(e).__name__}: {e}")
        self._end("error", "vLLM ended the request without an answer.")  # no-op when it ended above

    def _emit(self, out) -> None:
        """One of vLLM's delta outputs: text, token count and logprobs; the outcome when finished."""
        r = self.request
        tokens, logprobs = list(out.token_ids), list(out.logprobs or [])
        if out.finish_reason == "stop" and not isinstance(out.stop_reason, str) and tokens:
            # the end token: vLLM counts it, the built-in engine does not (nor sends its logprob)
            tokens, logprobs = tokens[:-1], logprobs[:len(tokens) - 1]
        if tokens and r.first_token_at is None:
            r.first_token_at = time.monotonic()
        r.completion_tokens += len(tokens)
        entries = [_entry(t, lp, r.params.top_logprobs) for t, lp in zip(tokens, logprobs)] if r.params.logprobs else []
        if out.finish_reason is None:
            if out.text or entries:
                self._queue.put_nowait(Event(out.text, entries))
            return
        if out.text:
            self._queue.put_nowait(Event(out.text, entries))
            entries = []
        if out.finish_reason in ("stop", "length"):
            self._end(out.finish_reason, logprobs=entries)
        else:  # "abort" or "error" from the engine
            self._end("error", f"vLLM ended the request: {out.finish_reason}.")


def _entry(token: int, logprobs: dict, top: int) -> tuple:
    """conch's (token, logprob, [(alternative, logprob), …]) from vLLM's {token: Logprob(rank, …)}."""
    alternatives = sorted(((t, lp.logprob, lp.rank) for t, lp in logprobs.items() if lp.rank <= top),
                          key=lambda a: a[2])
    return token, logprobs[token].logprob, [(t, lp) for t, lp, _ in alternatives]


class VLLMEngine:
    """vLLM's async engine with the interface of `conch.serving.engine.Engine` (``generate``, ``shutdown``, load).

    `from_model` starts vLLM's `AsyncLLM` for a model folder and builds the engine around it; the
    constructor takes an engine client that already exists (``llm``: what ``generate``, ``shutdown``
    and the generations call), with ``defaults`` (vLLM's sampling settings from the model, e.g.
    top_k) and ``sampling`` (`conch.chat.model_sampling`'s temperature and top_p for what a request
    leaves out)."""

    def __init__(self, llm, max_batch_size: int = 16, max_queue: int = 64, defaults: dict | None = None,
                 sampling: tuple = (0.0, 1.0), device: str = "cpu"):
        self.llm, self.device = llm, device
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.defaults = {} if defaults is None else defaults
        self.sampling = sampling
        self.running: set[Generation] = set()
        self.closing = False
        self._ids = itertools.count()

    @classmethod
    def from_model(cls, model_path: str | Path, max_batch_size: int = 16, max_queue: int = 64,
                   reasoning: bool = False, **engine_args) -> VLLMEngine:
        """Start vLLM's `AsyncLLM` on the model folder (``engine_args``: more of vLLM's engine arguments)."""
        require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from ..device import pick_device

        device = pick_device()
        args = dict(model=str(model_path), dtype=str(device.dtype).removeprefix("torch."),
                    max_num_seqs=max_batch_size, disable_log_stats=True)
        if device.device == "cpu":
            _cpu_settings()
            args.update(enforce_eager=True)  # vLLM's compile warm-up takes minutes on a CPU (--vllm_compile: do it)
        args["max_model_len"] = max_model_len(model_path)
        args.update(engine_args)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        config_file = Path(model_path) / "generation_config.json"
        sampling = model_sampling(json.loads(config_file.read_text(encoding="utf-8"))
                                  if config_file.exists() else {}, reasoning)
        return cls(llm, max_batch_size, max_queue, defaults=llm.model_config.get_diff_sampling_param(),
                   sampling=sampling, device=device.device)

    # -- the interface ----------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float = 120.0) -> Generation:
        if self.closing:
            raise QueueFull("the engine is shutting down")
        if len(self.running) >= self.max_batch_size + self.max_queue:
            raise QueueFull(f"{len(self.running) - self.max_batch_size} requests are already waiting")
        generation = Generation(self, Request(f"conch-{next(self._ids)}", prompt_ids, params, timeout_s))
        self.running.add(generation)
        return generation

    @property
    def queue_depth(self) -> int:
        """Requests beyond the batch: vLLM's scheduler keeps them waiting (first come, first served)."""
        return max(0, len(self.running) - self.max_batch_size)

    @property
    def active(self) -> int:
        return min(len(self.running), self.max_batch_size)

    def sampling_defaults(self, temperature: float | None, top_p: float | None) -> dict:
        """Temperature and top_p for a request: `conch.chat.model_sampling` fills in what it left out."""
        temperature = self.sampling[0] if temperature is None else temperature
        top_p = self.sampling[1] if top_p is None else top_p
        return {"temperature": float(temperature) or None, "top_p": float(top_p)}

    def sampling_params(self, params: SamplingParams):
        """vLLM's SamplingParams for conch's: deltas out, and the model's top_k / min_p as vLLM applies them."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra = {k: v for k, v in self.defaults.items() if k in ("top_k", "min_p")}
        repetition = params.repetition_penalty
        if repetition == 1.0:  # left out: the model's own, as vLLM's server does
            repetition = self.defaults.get("repetition_penalty", 1.0)
        return VLLMSamplingParams(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
            repetition_penalty=repetition, seed=params.seed, stop=list(params.stop) or None,
            logprobs=params.top_logprobs if params.logprobs else None,
            output_kind=RequestOutputKind.DELTA, **extra)

    def shutdown(self, timeout_s: float = 10) -> None:
        """Every request still running ends as ``shutdown``; vLLM's engine processes stop."""
        self.closing = True
        for generation in list(self.running):
            generation.cancel()
        self.llm.shutdown()


def max_model_len(model_path: str | Path) -> int:
    """The context vLLM is given: MAX_MODEL_LEN, or the model's own limit where that is shorter
    (the demo model has 8192 positions; vLLM refuses a longer max_model_len)."""
    import json

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return MAX_MODEL_LEN
    return min(MAX_MODEL_LEN, config.get("max_position_embeddings") or MAX_MODEL_LEN)


def _cpu_settings() -> None:
    """vLLM on a CPU: a KV cache of a set size, and the thread count set on purpose.

    vLLM binds its worker's OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND``, "auto": all
    cores but one, which it keeps for its scheduler process). ``CONCH_THREADS=N`` binds it to N of
    the cores this process may use, as the built-in engine uses N threads.
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    threads = os.environ.get("CONCH_THREADS")
    if threads and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cores[-int(threads):])


def start(cfg) -> tuple:
    """The tokenizer and a started `VLLMEngine` for a `conch.serve.ServeConfig` (the server's startup)."""
    from .. import hub

    path = Path(cfg.model) if Path(cfg.model).is_dir() else hub.resolve(cfg.model).path
    tokenizer = hub.load_tokenizer(path)
    compile_args = {"enforce_eager": False} if cfg.vllm_compile else {}  # else from_model's choice (eager on a CPU)
    return tokenizer, VLLMEngine.from_model(path, cfg.max_batch_size, cfg.max_queue,
                                             reasoning=is_reasoning_model(tokenizer), **compile_args)
