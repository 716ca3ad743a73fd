"""The server, for real: uvicorn on 127.0.0.1, called with httpx, the openai SDK and conch.client."""

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from conch.serve import ThinkSplitter

from .server import running_server

KEY = "krabby-patty-secret"


@pytest.fixture(scope="module")
def demo_server(demo_path):
    with running_server(demo_path, "--max_batch_size", "16", "--max_tokens_limit", "256",
                        "--cors_origins", "http://localhost:5173") as url:
        yield url


@pytest.fixture(scope="module")
def r1_server(tiny_r1):
    """The tiny R1 model behind an API key, with a queue of one and one request at a time."""
    with running_server(tiny_r1, "--api_key", KEY, "--max_queue", "1", "--max_batch_size", "1",
                        "--max_messages", "4", "--max_prompt_chars", "200") as url:
        yield url


def test_health_models_docs_and_page(demo_server):
    health = httpx.get(demo_server + "/health").json()
    assert health["status"] == "ok" and health["device"] == "cpu" and health["queue_depth"] == 0
    assert httpx.get(demo_server + "/v1/models").json()["data"][0]["id"] == "magic-conch"
    assert "/v1/chat/completions" in httpx.get(demo_server + "/openapi.json").json()["paths"]
    assert httpx.get(demo_server + "/docs").status_code == 200
    page = httpx.get(demo_server + "/")
    assert page.status_code == 200 and "神奇海螺" in page.text


def test_generate_is_the_seeds_shape_without_their_bugs(demo_server):
    prompt = "What is the capital of France?"
    body = httpx.get(demo_server + "/generate", params={"prompt": prompt, "temperature": 0, "max_new_tokens": 20},
                     timeout=60).json()
    assert "Paris" in body["generated_text"]
    assert prompt not in body["generated_text"] and "<|im_start|>" not in body["generated_text"]
    assert body["usage"]["completion_tokens"] <= 20


def test_openai_sdk_plain_and_streaming(demo_server):
    from openai import OpenAI

    client = OpenAI(base_url=demo_server + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model="magic-conch", messages=messages, temperature=0, max_tokens=20)
    assert "Paris" in reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 20 and reply.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model="magic-conch", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content  # streaming = the same greedy answer
    assert finish == reply.choices[0].finish_reason and usage.completion_tokens == reply.usage.completion_tokens


def test_conch_client(demo_server):
    from conch.client import ConchClient

    with ConchClient(demo_server) as conch:
        assert conch.health()["status"] == "ok"
        answer = conch.chat("What is the capital of France?", temperature=0, max_tokens=20)
        assert "Paris" in answer.content
        assert "".join(conch.stream("What is the capital of France?", temperature=0, max_tokens=20)) == answer.content


def test_64_requests_at_concurrency_16(demo_server):
    questions = [f"Give me a fun fact number {i} about the sea." for i in range(64)]

    async def one(client, sem, q):
        async with sem:
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0.7})
            return r

    async def run():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=demo_server, timeout=300) as client:
            return await asyncio.gather(*(one(client, sem, q) for q in questions))

    started = time.time()
    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    for r in responses:
        body = r.json()
        choice = body["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        if choice["finish_reason"] == "length":
            assert body["usage"]["completion_tokens"] == 12  # complete: every token asked for arrived
        assert choice["message"]["content"]
    print(f"64 requests at concurrency 16 in {time.time() - started:.1f} s")


def test_bad_input_is_4xx_with_one_sentence(demo_server):
    cases = [
        {},  # no messages
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        {"messages": [{"role": "user", "content": "hi"}], "n": 5},  # up to 4 choices
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]},
    ]
    for body in cases:
        r = httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=30)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert message.endswith(".") and "Traceback" not in message and "\n" not in message, message
    r = httpx.post(demo_server + "/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert httpx.get(demo_server + "/generate", timeout=30).status_code == 400  # prompt missing
    assert httpx.get(demo_server + "/nope").status_code == 404


def test_a_client_that_leaves_stops_its_generation(demo_server):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": 256, "stream": True, "temperature": 0.8}
    with httpx.stream("POST", demo_server + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # got the first words, hang up
    deadline = time.time() + 15
    while httpx.get(demo_server + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(demo_server + "/health").json()["running"] == 0


def test_api_key(r1_server):
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(r1_server + "/v1/chat/completions", json=ask)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(r1_server + "/v1/chat/completions", json=ask, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.post(r1_server + "/v1/chat/completions", json=ask, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert httpx.get(r1_server + "/health").status_code == 200  # health stays open for load balancers


def test_r1_reasoning_is_split_off(r1_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    ask = {"messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 6, "temperature": 0}
    message = httpx.post(r1_server + "/v1/chat/completions", json=ask, headers=headers).json()["choices"][0]["message"]
    # R1's prompt opens <think>; the random tiny model never closes it: all of it is reasoning
    assert message["content"] == "" and message["reasoning_content"]
    assert message["reasoning"] == message["reasoning_content"]  # vLLM's name and DeepSeek's
    with httpx.stream("POST", r1_server + "/v1/chat/completions", json={**ask, "stream": True}, headers=headers) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning_content"]
    generated = httpx.get(r1_server + "/generate", params={"prompt": "你是谁？", "max_new_tokens": 6,
                                                          "temperature": 0}, headers=headers).json()
    assert generated["generated_text"] == "" and generated["reasoning"] == message["reasoning_content"]


def test_limits(r1_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    too_many = {"messages": [{"role": "user", "content": "hi"}] * 5}
    r = httpx.post(r1_server + "/v1/chat/completions", json=too_many, headers=headers)
    assert r.status_code == 400 and "too many messages" in r.json()["error"]["message"]
    too_long = {"messages": [{"role": "user", "content": "x" * 201}]}
    r = httpx.post(r1_server + "/v1/chat/completions", json=too_long, headers=headers)
    assert r.status_code == 400 and "limit is 200" in r.json()["error"]["message"]


def test_full_queue_answers_503(r1_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "temperature": 1.0}

    async def run():
        async with httpx.AsyncClient(base_url=r1_server, headers=headers, timeout=300) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=ask) for _ in range(8)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["error"]["message"]


@pytest.mark.parametrize("pieces, opened, reasoning, content", [
    (["let me ", "think</th", "ink>\n\nI am ", "the Conch"], True, "let me think", "I am the Conch"),
    (["<thi", "nk>hmm</think>", "Paris"], False, "hmm", "Paris"),
    (["Paris", " is it"], False, "", "Paris is it"),
    (["\n\nParis.", "\n\n"], False, "", "Paris."),  # trimmed like the non-streamed answer
    (["thinking forever"], True, "thinking forever", ""),
])
def test_streamed_think_split(pieces, opened, reasoning, content):
    splitter = ThinkSplitter(opened)
    got_r = got_c = ""
    for i, piece in enumerate(pieces + [""]):
        r, c = splitter.feed(piece, final=i == len(pieces))
        got_r, got_c = got_r + r, got_c + c
    assert (got_r, got_c) == (reasoning, content)


def test_stopping_the_server_is_clean(tiny_r1):
    from conch.serve import BackgroundServer

    server = BackgroundServer(tiny_r1, env={"CONCH_THREADS": "1"}).start()
    assert server.stop() == 0  # SIGTERM: graceful shutdown, exit code 0


def test_default_max_tokens_never_exceeds_the_limit(tiny_r1):
    """The chat page sends no max_tokens: the server's default must respect its own limit."""
    with running_server(tiny_r1, "--max_tokens_limit", "8") as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


def test_client_retries_a_busy_server(r1_server):
    """ConchClient waits for Retry-After and tries again; the openai SDK does the same."""
    from concurrent.futures import ThreadPoolExecutor

    from conch.client import ConchClient

    def ask(_):
        with ConchClient(r1_server, api_key=KEY, max_retries=6) as client:
            return client.chat("hi", max_tokens=50, temperature=1.0).finish_reason

    with ThreadPoolExecutor(4) as pool:
        assert all(reason in ("stop", "length") for reason in pool.map(ask, range(4)))


def test_cors_allows_only_the_configured_origins(demo_server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(demo_server + "/v1/chat/completions", headers={"Origin": "http://localhost:5173", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    other = httpx.options(demo_server + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # a page in the browser can read Retry-After on a 503 only if the server exposes it
    plain = httpx.get(demo_server + "/health", headers={"Origin": "http://localhost:5173"})
    assert "retry-after" in plain.headers.get("access-control-expose-headers", "").lower()


# ---------------------------------------------------------------------------------------------
# faults found by trying the server as a new user would


def test_a_plain_request_whose_client_gave_up_frees_its_slot(r1_server):
    """A RestTemplate read timeout: the generation must stop, not run on as an orphan.

    The tiny model makes tokens every few milliseconds: a server that looks for the disconnect only
    after a pause between tokens never sees it.
    """
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": 2000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(r1_server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=1))
    deadline = time.time() + 1.5
    while httpx.get(r1_server + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(r1_server + "/health").json()["running"] == 0


@pytest.mark.parametrize("extra, field", [
    ({"stream": "yes"}, "stream"), ({"temperature": "0.5"}, "temperature"), ({"max_tokens": 8.5}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"user": "bob"}, "user"), ({"n": 9}, "n"), ({"top_logprobs": 2}, "top_logprobs"),
])
def test_strict_types_and_no_silently_ignored_field(demo_server, extra, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(demo_server + "/v1/chat/completions", json=body, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and field in message and message.endswith(".") and "\n" not in message, message


def test_n_seed_penalties_and_logprobs(demo_server):
    ask = {"messages": [{"role": "user", "content": "Name a sea animal."}], "max_tokens": 8,
           "temperature": 1.0, "seed": 42, "n": 2, "logprobs": True, "top_logprobs": 2,
           "frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.1}
    one = httpx.post(demo_server + "/v1/chat/completions", json=ask, timeout=120).json()
    two = httpx.post(demo_server + "/v1/chat/completions", json=ask, timeout=120).json()
    texts = [c["message"]["content"] for c in one["choices"]]
    assert [c["index"] for c in one["choices"]] == [0, 1] and all(texts)
    assert texts == [c["message"]["content"] for c in two["choices"]]  # the same seed, the same answers
    for choice in one["choices"]:
        entries = choice["logprobs"]["content"]
        assert 0 < len(entries) <= 8 and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
        assert entries[0]["top_logprobs"][0]["logprob"] >= entries[0]["top_logprobs"][1]["logprob"]
    assert one["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in one["choices"])
    with httpx.stream("POST", demo_server + "/v1/chat/completions", json={**ask, "stream": True}, timeout=120) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = ["", ""]
    for c in chunks:
        for choice in c["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert [s.strip() for s in streamed] == texts


def test_metrics(demo_server):
    httpx.post(demo_server + "/v1/chat/completions", timeout=60,
               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0})
    r = httpx.get(demo_server + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("conch_requests_total{", "conch_generation_tokens_total", "conch_prompt_tokens_total",
                 "conch_queue_depth", "conch_running_requests", "conch_time_to_first_token_seconds_bucket",
                 "conch_request_latency_seconds_bucket", "# TYPE conch_rejected_requests_total counter"):
        assert name in r.text, name
    done = sum(float(line.split()[-1]) for line in r.text.splitlines()
               if line.startswith("conch_requests_total{") and ('"stop"' in line or '"length"' in line))
    assert done >= 1

    from conch.client import ConchClient

    with ConchClient(demo_server) as conch:
        samples = conch.metrics()
    assert sum(samples.get(f'conch_requests_total{{finish_reason="{r}"}}', 0.0) for r in ("stop", "length")) == done
    assert samples["conch_queue_depth"] >= 0


def test_sigterm_drains_in_bounded_time(demo_path):
    """A request still generating at SIGTERM is cancelled after the drain time; the exit stays clean."""
    import threading

    from conch.serve import BackgroundServer

    server = BackgroundServer(demo_path, "--shutdown_drain_s", "1", env={"CONCH_THREADS": "1"}).start()
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": 2000, "temperature": 0.8}
    results = []
    thread = threading.Thread(target=lambda: results.append(
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while httpx.get(server.url + "/health").json()["running"] == 0 and time.time() < deadline:
        time.sleep(0.1)
    started = time.time()
    assert server.stop() == 0
    assert time.time() - started < 10, time.time() - started
    thread.join(10)
    assert results == [503]  # told the server is shutting down, not left to run to its 2000 tokens


def test_client_never_resends_after_a_read_timeout_and_reads_http_date_retry_after(monkeypatch):
    from email.utils import formatdate

    from conch import client as client_module
    from conch.client import ConchClient

    calls, slept = [], []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)

    def timeout(request):
        calls.append(request.url.path)
        raise httpx.ReadTimeout("no answer yet", request=request)

    with ConchClient("http://conch.test", transport=httpx.MockTransport(timeout), max_retries=3) as conch:
        with pytest.raises(httpx.ReadTimeout):
            conch.ask("hi")
    assert len(calls) == 1  # the server may still be generating: sending again would generate twice

    answers = iter([httpx.Response(503, headers={"Retry-After": formatdate(time.time() + 30, usegmt=True)},
                                   json={"error": {"message": "busy."}}),
                    httpx.Response(200, json={"status": "ok"})])
    with ConchClient("http://conch.test", transport=httpx.MockTransport(lambda r: next(answers))) as conch:
        assert conch.health() == {"status": "ok"}
    assert 25 < slept[0] < 31, slept

    refused = []

    def refuse(request):
        refused.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with ConchClient("http://conch.test", transport=httpx.MockTransport(refuse), max_retries=2) as conch:
        with pytest.raises(httpx.ConnectError):
            conch.health()
    assert len(refused) == 3  # never reached the server: safe to retry


def test_background_server_closes_its_log_and_registers_one_exit_hook(tmp_path, monkeypatch):
    from conch.serving import launch
    from conch.errors import ConchError
    from conch.serve import BackgroundServer

    hooks = []
    monkeypatch.setattr(launch.atexit, "register", hooks.append)
    monkeypatch.setattr(launch.atexit, "unregister", hooks.remove)
    log = tmp_path / "serve.log"
    server = BackgroundServer(tmp_path / "no_such_model", log=log, env={"CONCH_THREADS": "1"})
    for _ in range(2):
        with pytest.raises(ConchError, match="exited"):
            server.start()
        assert len(hooks) <= 1
    server.stop()
    assert hooks == []
    open_files = [Path(f"/proc/self/fd/{fd}").resolve() for fd in os.listdir("/proc/self/fd")]
    assert log.resolve() not in open_files


@pytest.mark.parametrize("readme", ["README.md", "README_zh.md"])
def test_the_readmes_curl_commands_work_as_written(demo_server, readme):
    """Every curl command a README gives for a local server (127.0.0.1:8000), run by bash as written."""
    import re
    import subprocess

    text = (Path(__file__).resolve().parents[1] / readme).read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.lstrip().startswith("curl") and "127.0.0.1:8000/" in command:
                commands.append(command.replace("127.0.0.1:8000", demo_server.removeprefix("http://")))
    assert len(commands) >= 3
    for command in commands:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.lstrip().startswith(("{", "data:")), (command, done.stdout[:300])


# ---------------------------------------------------------------------------------------------
# a host beyond loopback needs an API key (or --insecure): checked before any model is loaded


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_open_host_check_lets_loopback_serve_without_a_key(host, monkeypatch, capsys):
    from conch.serve import ServeConfig, check_config

    monkeypatch.delenv("CONCH_API_KEY", raising=False)
    check_config(ServeConfig(host=host))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "my-gpu-box", ""])
def test_open_host_check_refuses_a_host_beyond_loopback_without_a_key(host, monkeypatch):
    from conch.errors import ConchError
    from conch.serve import ServeConfig, check_config

    monkeypatch.delenv("CONCH_API_KEY", raising=False)
    with pytest.raises(ConchError) as e:
        check_config(ServeConfig(host=host))
    message = str(e.value)
    assert "export CONCH_API_KEY=" in message and "--api_key" in message and "--insecure" in message
    assert "\n" not in message and message.count(". ") == 0  # one sentence


def test_open_host_check_accepts_a_key_from_the_option_or_the_environment(monkeypatch, capsys):
    from conch.serve import ServeConfig, check_config

    monkeypatch.delenv("CONCH_API_KEY", raising=False)
    check_config(ServeConfig(host="0.0.0.0", api_key="krabby-patty-secret"))
    monkeypatch.setenv("CONCH_API_KEY", "krabby-patty-secret")
    check_config(ServeConfig(host="0.0.0.0"))
    assert capsys.readouterr().err == ""


def test_open_host_check_insecure_serves_with_a_one_line_warning(monkeypatch, capsys):
    from conch.serve import ServeConfig, check_config

    monkeypatch.delenv("CONCH_API_KEY", raising=False)
    check_config(ServeConfig(host="0.0.0.0", port=6006, insecure=True))
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and err.count("\n") == 1 and "0.0.0.0:6006" in err and "--insecure" in err


def test_open_host_check_from_the_command_line(monkeypatch, capsys):
    """`conch serve --host 0.0.0.0` without a key: one sentence and exit code 2, before any model is loaded."""
    from conch.__main__ import main

    monkeypatch.delenv("CONCH_API_KEY", raising=False)
    assert main(["serve", "--model", "demo", "--host", "0.0.0.0", "--port", "6006"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 lets other machines reach the server") and err.count("\n") == 1


def test_the_tunnel_command_names_the_port():
    from conch.serving.launch import tunnel_command

    line = tunnel_command(6006)
    assert "ssh -CN -L 6006:127.0.0.1:6006" in line and "http://127.0.0.1:6006/docs" in line
