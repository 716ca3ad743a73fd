"""Serving throughput: `python -m conch serve` (continuous batching) vs the seeds' server.

Each server runs as a subprocess on 127.0.0.1 and gets the same prompts (questions from
data/magic_conch_eval.json) with the same max_tokens, greedy, at each concurrency level;
conch is called with streaming (OpenAI chat completions, SSE) to measure time to first
token, the seeds' server with its one `GET /answer`. Reported per server and level: output
tokens/s, requests/s, p50/p95 latency, p50 TTFT, and single-stream decode tokens/s (at
concurrency 1: tokens after the first / time after the first). Each server gets two warm-up
requests first.

Examples:
  python bench/serve_throughput.py --model demo --concurrency 1,4,16 --max-tokens 64 --out outputs/bench/serve_cpu.json
  python bench/serve_throughput.py --model deepseek-r1-1.5b-arch --concurrency 1,4,16,64 \\
      --seeds-concurrency 1,4,16 --max-tokens 128 --conch-args "--max_batch_size 64" --out outputs/bench/serve_gpu.json
  python bench/serve_throughput.py --model deepseek-r1-1.5b-arch --profile-engine 1,16,64   # no HTTP: engine steps
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import r1_arch  # noqa: E402

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
parser.add_argument("--model", default="demo", help=f"demo | tiny | {r1_arch.NAME} | a local model folder")
parser.add_argument("--servers", default="conch,seeds",
                    help="which servers to run, in order: conch, seeds, conch-vllm (conch serve --engine vllm), "
                         "vllm (vLLM's own OpenAI server, set up as conch sets vLLM up), vllm-defaults (the same "
                         "at vLLM's own dtype and compile defaults); the last three from --vllm-python")
parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="the Python of `make vllm`")
parser.add_argument("--concurrency", default="1,4,16", help="concurrency levels (conch)")
parser.add_argument("--seeds-concurrency", default=None,
                    help="levels for the seeds' server (default: --concurrency); it serves one request at a "
                         "time, so its tokens/s does not grow with concurrency, only its latency")
parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
parser.add_argument("--rounds", type=float, default=2, help="requests per level = max(--min-requests, rounds x level)")
parser.add_argument("--min-requests", type=int, default=4)
parser.add_argument("--conch-args", default="",
                    help="extra `python -m conch serve` settings, e.g. '--max_batch_size 64'")
parser.add_argument("--threads", type=int, default=None, help="CPU threads of the servers (CONCH_THREADS)")
parser.add_argument("--work-dir", default="outputs/bench", help="where built models (tiny, arch) are saved")
parser.add_argument("--startup-s", type=float, default=600, help="how long a server may take to start")
parser.add_argument("--profile-engine", default=None,
                    help="batch sizes: instead of HTTP, run conch's Engine in this process and time its steps")
parser.add_argument("--out", default=None, help="write the results as JSON here")
parser.add_argument("--plot", default=None, help="write a PNG of tokens/s against concurrency here")
args = parser.parse_args()


@dataclass
class Level:
    server: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    p50_ttft_s: float | None
    decode_tokens_per_s: float  # per stream: tokens after the first / time after the first (median)
    p50_generate_s: float | None = None  # seeds: model.generate's own time per request (no queueing)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))] if values else float("nan")


def model_folder() -> Path:
    from conch import hub

    work = Path(args.work_dir)
    if args.model == "demo":
        return hub.resolve("demo").path
    if args.model == "tiny":
        from conch.tiny import build_tiny_r1

        folder = work / "tiny-r1"
        return folder if (folder / "config.json").exists() else build_tiny_r1(folder)
    if args.model == r1_arch.NAME:
        import torch

        work.mkdir(parents=True, exist_ok=True)
        return r1_arch.save_folder(work / r1_arch.NAME, "cuda" if torch.cuda.is_available() else "cpu")
    return Path(args.model)


def prompts() -> list[str]:
    rows = json.loads(Path("data/magic_conch_eval.json").read_text(encoding="utf-8"))
    return [r["instruction"] + (("\n" + r["input"]) if r.get("input") else "") for r in rows]


# ---------------------------------------------------------------------------------------------
# the client


async def call(client, server: str, url: str, prompt: str) -> dict:
    started = time.perf_counter()
    ttft = generate_s = None
    if server == "seeds":
        r = await client.get(url + "/answer", params={"prompt": prompt, "max_new_tokens": args.max_tokens})
        r.raise_for_status()
        tokens, generate_s = r.json()["completion_tokens"], r.json()["generate_s"]
    else:
        body = {"model": "magic-conch", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens = None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if ttft is None and (delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")):
                    ttft = time.perf_counter() - started
    return {"latency": time.perf_counter() - started, "ttft": ttft, "tokens": tokens, "generate_s": generate_s}


async def run_level(server: str, url: str, concurrency: int, questions: list[str], warmup: int) -> Level:
    import httpx

    n = max(args.min_requests, round(args.rounds * concurrency))
    todo = [questions[i % len(questions)] for i in range(n)]
    done, errors = [], []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as client:
        for q in todo[:warmup]:  # warm-up, not measured
            await call(client, server, url, q)

        async def worker():
            while todo:
                q = todo.pop()
                try:
                    done.append(await call(client, server, url, q))
                except Exception as e:  # count it, keep going
                    errors.append(f"{type(e).__name__}: {e}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", flush=True)
    tokens = sum(d["tokens"] or 0 for d in done)
    per_stream = [((d["tokens"] - 1) / (d["latency"] - d["ttft"])) if d["ttft"] is not None and d["tokens"] > 1
                  else d["tokens"] / d["latency"] for d in done if d["tokens"]]
    ttfts = [d["ttft"] for d in done if d["ttft"] is not None]
    return Level(server, concurrency, n, len(errors), wall, tokens, tokens / wall, len(done) / wall,
                 pct([d["latency"] for d in done], 0.5), pct([d["latency"] for d in done], 0.95),
                 pct(ttfts, 0.5) if ttfts else None, pct(per_stream, 0.5),
                 pct([d["generate_s"] for d in done if d["generate_s"]], 0.5) if server == "seeds" else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server: str, folder: Path) -> tuple[subprocess.Popen, str]:
    from conch.serve import wait_until_healthy

    port = free_port()
    if server == "conch":
        cmd = [sys.executable, "-m", "conch", "serve", "--model", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--max_tokens_limit", str(max(2048, args.max_tokens)),
               *shlex.split(args.conch_args)]
    elif server == "conch-vllm":  # the same server on vLLM, from .venv-vllm
        cmd = [args.vllm_python, "-m", "conch", "serve", "--engine", "vllm", "--model", str(folder),
               "--host", "127.0.0.1", "--port", str(port), "--max_tokens_limit", str(max(2048, args.max_tokens)),
               *shlex.split(args.conch_args)]
    elif server in ("vllm", "vllm-defaults"):
        # vLLM alone: "vllm" set up as conch.serving.engine_vllm sets it up (on a CPU: float32, no torch.compile),
        # "vllm-defaults" with vLLM's own choice of dtype and compilation
        import torch

        from conch.serving.engine_vllm import max_model_len

        cpu = not torch.cuda.is_available()
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--served-model-name", "magic-conch", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len(folder)), "--max-num-seqs", "16", "--disable-uvicorn-access-log",
               *(["--dtype", "float32", "--enforce-eager"] if cpu and server == "vllm" else [])]
    else:
        cmd = [sys.executable, str(HERE / "seeds_server.py"), "--model", str(folder), "--port", str(port)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["CONCH_THREADS"] = str(args.threads)
        if server in ("vllm", "vllm-defaults", "conch-vllm"):  # vLLM binds its worker's threads to these cores
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))[-args.threads:]))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    log = open(Path(args.work_dir) / f"{server}_server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    status = wait_until_healthy(url, proc, args.startup_s)
    if status == "exited":
        raise SystemExit(f"{server} server exited with {proc.returncode}; see {log.name}")
    if status == "timeout":
        proc.kill()
        raise SystemExit(f"{server} server did not start in {args.startup_s:.0f} s; see {log.name}")
    return proc, url


# ---------------------------------------------------------------------------------------------
# --profile-engine: conch's Engine without HTTP, step by step


def profile_engine(folder: Path, sizes: list[int]) -> list[dict]:
    """Time the engine's prefill and decode steps; split each step into model forward and the rest."""
    import cProfile
    import pstats

    import torch

    from conch import chat
    from conch.serving.engine import Engine, Request
    from conch.serving.sampling import SamplingParams

    model, tokenizer = chat.load(folder)
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class TimedModel:  # the engine calls model(...) and reads model.device
        def __init__(self, model):
            self.model, self.device, self.seconds, self.calls = model, model.device, 0.0, 0

        def __call__(self, *a, **kw):
            sync()
            t = time.perf_counter()
            out = self.model(*a, **kw)
            sync()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            return out

    questions = prompts()
    rows = []
    for size in sizes:
        engine = Engine(model, tokenizer, max_batch_size=size, max_queue=10**6, start=False)  # we drive the steps
        engine.model = timed = TimedModel(model)
        ids = [tokenizer(chat.render_prompt(tokenizer, chat.to_messages(q)), add_special_tokens=False)["input_ids"]
               for q in questions]
        for warm in (True, False):
            requests = [Request(ids[i % len(ids)], SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
                                timeout_s=3600) for i in range(size)]
            timed.seconds = 0.0
            started = time.perf_counter()
            engine.admit(requests)
            sync()
            admit_s = time.perf_counter() - started
            timed.seconds, steps = 0.0, 0
            profiler = cProfile.Profile()
            profiler.enable()
            started = time.perf_counter()
            while engine.running:
                engine.step()
                steps += 1
            sync()
            decode_s = time.perf_counter() - started
            profiler.disable()
            if warm:
                continue
            tokens = sum(len(r.tokens) for r in requests)
            stats = pstats.Stats(profiler)
            cum = {f"{Path(k[0]).name}:{k[2]}": v[3] for k, v in stats.stats.items()}
            top = lambda name: sum(v for k, v in cum.items() if k.endswith(":" + name))  # noqa: E731
            row = {"batch": size, "prompt_tokens_max": max(len(r.prompt_ids) for r in requests),
                   "admit_s": admit_s, "steps": steps, "tokens": tokens, "decode_s": decode_s,
                   "tokens_per_s": tokens / decode_s, "step_ms": 1000 * decode_s / steps,
                   "forward_ms": 1000 * timed.seconds / steps,
                   "emit_decode_ms": 1000 * top("_emit") / steps, "sample_ms": 1000 * top("sample") / steps,
                   "trim_ms": 1000 * top("_trim") / steps}
            row["other_ms"] = row["step_ms"] - row["forward_ms"] - row["emit_decode_ms"] - row["sample_ms"]
            rows.append(row)
            print(f"batch {size}: {steps} steps, {row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.2f} ms = "
                  f"forward {row['forward_ms']:.2f} + emit/decode {row['emit_decode_ms']:.2f} + sample "
                  f"{row['sample_ms']:.2f} + other {row['other_ms']:.2f}; prefill {1000 * admit_s:.0f} ms", flush=True)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(10)
    return rows


# ---------------------------------------------------------------------------------------------
# main

folder = model_folder()
report = {"model": args.model, "model_folder": str(folder), "settings": vars(args)}
try:
    import torch

    report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
except Exception:  # noqa: BLE001
    report["device"] = "?"

if args.profile_engine:
    rows = profile_engine(folder, [int(x) for x in args.profile_engine.split(",")])
    report["engine_profile"] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    sys.exit(0)

def row(lv: Level) -> str:
    ttft = f"{lv.p50_ttft_s:.3f}" if lv.p50_ttft_s is not None else "-"
    return (f"{lv.server:<10} {lv.concurrency:>4} {lv.requests:>4} {lv.errors:>3} {lv.tokens_per_s:>10,.1f} "
            f"{lv.requests_per_s:>7.2f} {lv.p50_latency_s:>7.2f} {lv.p95_latency_s:>7.2f} {ttft:>8} "
            f"{lv.decode_tokens_per_s:>12.1f}")


def save(values: dict) -> None:
    report.update(values)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


header = f"{'server':<10} {'conc':>4} {'reqs':>4} {'err':>3} {'out tok/s':>10} {'req/s':>7} {'p50 s':>7} " \
         f"{'p95 s':>7} {'TTFT p50':>8} {'stream tok/s':>12}"
questions = prompts()
levels: list[Level] = []
startup_s: dict[str, float] = {}  # from the command to a healthy /health: loading, and vLLM's compilation
print(header, flush=True)
Path(args.work_dir).mkdir(parents=True, exist_ok=True)
for server in args.servers.split(","):
    spec = args.seeds_concurrency if server == "seeds" and args.seeds_concurrency else args.concurrency
    starting = time.perf_counter()
    proc, url = start_server(server, folder)
    startup_s[server] = round(time.perf_counter() - starting, 1)
    print(f"{server} ready in {startup_s[server]:.0f} s", flush=True)
    save({"startup_s": startup_s})
    try:
        for i, c in enumerate(int(x) for x in spec.split(",")):
            level = asyncio.run(run_level(server, url, c, questions, warmup=2 if i == 0 else 0))
            levels.append(level)
            print(row(level), flush=True)
            save({"levels": [asdict(lv) for lv in levels]})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

print(f"\nmodel {args.model} on {report['device']}, max_tokens {args.max_tokens}, greedy")
print(header + "\n" + "-" * len(header))
for lv in levels:
    print(row(lv))

# conch against the seeds at each level; a level the seeds did not run compares with their best
seeds = {lv.concurrency: lv for lv in levels if lv.server == "seeds"}
comparison = []
if seeds:
    best = max(seeds.values(), key=lambda lv: lv.tokens_per_s)
    for lv in (lv for lv in levels if lv.server == "conch"):
        ref = seeds.get(lv.concurrency, best)
        comparison.append({"concurrency": lv.concurrency, "seeds_concurrency": ref.concurrency,
                           "throughput_ratio": lv.tokens_per_s / ref.tokens_per_s,
                           "p95_latency_ratio": lv.p95_latency_s / ref.p95_latency_s})
        print(f"conch c={lv.concurrency}: {comparison[-1]['throughput_ratio']:.1f}x the seeds' tokens/s "
              f"(seeds at c={ref.concurrency}), p95 latency {comparison[-1]['p95_latency_ratio']:.2f}x theirs")
save({"levels": [asdict(lv) for lv in levels], "comparison": comparison})
if args.plot and levels:
    from plot import plot_serve

    plot_serve([asdict(lv) for lv in levels], f"{args.model} on {report['device']}, max_tokens {args.max_tokens}",
               args.plot)
