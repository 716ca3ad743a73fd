"""The server, for real: uvicorn on 127.0.0.1, called with httpx, the openai SDK and conch.client."""

import asyncio
import json
import time

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
        {"messages": [{"role": "user", "content": "hi"}], "n": 3},
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
    with httpx.stream("POST", r1_server + "/v1/chat/completions", json={**ask, "stream": True}, headers=headers) as r:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
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
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(demo_server + "/v1/chat/completions", headers={"Origin": "http://localhost:5173", **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    other = httpx.options(demo_server + "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
