"""The server on vLLM (``--engine vllm``) against the built-in engine, both for real on 127.0.0.1.

One vLLM server (from .venv-vllm, which `make vllm` builds; `make test` builds it in the background) and one
built-in server with the same flags on the demo model: the same routes, auth, limits, RAG,
cancellation and 503, the same 4xx sentences, and greedy answers compared prompt by prompt.
"""

import asyncio
import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conch.errors import ConchError
from conch.serving.launch import BackgroundServer, wait_until_healthy
from tests import venv_builds

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
KEY = "krabby-patty-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLAGS = ["--api_key", KEY, "--max_batch_size", "4", "--max_queue", "2", "--max_tokens_limit", "256",
         "--max_messages", "4", "--max_prompt_chars", "400", "--rag_dir", str(ROOT / "data" / "knowledge"),
         "--cors_origins", "http://localhost:5173"]
THREADS = {"CONCH_THREADS": os.environ.get("CONCH_THREADS", "1"), "OMP_NUM_THREADS": "1"}
PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 3?",
           "Write one sentence about the sea.", "Who wrote Romeo and Juliet?", "What do bees make?",
           "Translate 'good morning' into French.", "Give me a synonym for happy."]


def test_engine_setting_is_checked_in_one_sentence():
    from conch.serve import ServeConfig, check_engine

    with pytest.raises(ConchError, match=r"^engine 'fast' is unknown; use --engine builtin .*\.$"):
        check_engine(ServeConfig(engine="fast"))
    check_engine(ServeConfig(engine="builtin"))
    with pytest.raises(ConchError, match=r"^--vllm_compile applies to --engine vllm only; .*\.$"):
        check_engine(ServeConfig(vllm_compile=True))
    try:
        import vllm  # noqa: F401 - the main environment has no vLLM
    except ImportError:
        with pytest.raises(ConchError, match=r"^vLLM is not installed in this environment; run `make vllm`"):
            check_engine(ServeConfig(engine="vllm"))


def test_vllm_compile_lets_vllm_compile(monkeypatch, demo_path):
    from conch.serve import ServeConfig
    from conch.serving import engine_vllm

    calls = []
    monkeypatch.setattr(engine_vllm.VLLMEngine, "from_model", lambda *a, **kw: calls.append(kw))
    for compile_it in (False, True):
        engine_vllm.start(ServeConfig(model=str(demo_path), engine="vllm", vllm_compile=compile_it))
    assert "enforce_eager" not in calls[0]  # from_model's own choice: eager on a CPU
    assert calls[1]["enforce_eager"] is False


def test_max_model_len_stays_within_the_models_positions(tmp_path):
    from conch.serving.engine_vllm import MAX_MODEL_LEN, max_model_len

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    assert max_model_len(tmp_path) == 8192  # the demo model: vLLM refuses a longer context
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    assert max_model_len(tmp_path) == MAX_MODEL_LEN
    assert max_model_len(tmp_path / "missing") == MAX_MODEL_LEN


@contextmanager
def vllm_server(model, *args: str):
    """``conch serve --engine vllm`` run by .venv-vllm's Python on a free port; its log in the failure message."""
    venv_builds.wait_for("vllm")  # `make test` builds it in the background
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no {VLLM_PYTHON.parent.parent.name}: run `make vllm` to test the server on vLLM")
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="conch-vllm-", delete=False)
    env = {**os.environ, **THREADS, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([str(VLLM_PYTHON), "-m", "conch", "serve", "--engine", "vllm", "--model", str(model),
                                "--host", "127.0.0.1", "--port", str(port), *args],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        status = wait_until_healthy(url, process, 900)
        if status != "ready":
            log.seek(0)
            pytest.fail(f"the vLLM server is {status}: {log.read()[-3000:]}")
        yield url
    finally:
        process.terminate()
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.close()
        os.unlink(log.name)
        assert code == 0, f"the vLLM server exited with {code} on SIGTERM"


@pytest.fixture(scope="module")
def servers(demo_path):
    """(vLLM, built-in): two servers with the same flags on the demo model."""
    with vllm_server(demo_path, *FLAGS) as vllm_url:
        with BackgroundServer(demo_path, *FLAGS, env=THREADS) as builtin:
            yield vllm_url, builtin.url


@pytest.fixture(scope="module")
def vllm(servers):
    return servers[0]


def ask(url, content, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24, "rag": False,
            **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)


def test_routes_auth_and_page(vllm):
    health = httpx.get(vllm + "/health").json()  # open for load balancers
    assert health["status"] == "ok" and health["device"] == "cpu" and health["running"] == 0
    assert health["knowledge"]["files"] > 0
    r = httpx.get(vllm + "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key" in httpx.get(vllm + "/v1/models",
                                  headers={"Authorization": "Bearer wrong"}).json()["error"]["message"]
    assert httpx.get(vllm + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "magic-conch"
    assert "神奇海螺" in httpx.get(vllm + "/").text and httpx.get(vllm + "/docs").status_code == 200
    preflight = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"}
    assert httpx.options(vllm + "/v1/chat/completions", headers=preflight).headers[
        "access-control-allow-origin"] == "http://localhost:5173"


def test_chat_page_streams_an_answer_on_vllm(vllm, browser):
    """The chat page in headless Chromium (tests/conftest.py) against the vLLM server, its API key typed in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(vllm + "/")
    assert "神奇海螺" in browser.title
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "input").send_keys("What is the capital of France?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 180).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true'], .error"))
    errors = browser.find_elements(By.CSS_SELECTOR, ".error")
    assert not errors, errors[0].text
    # this server runs in RAG mode (--rag_dir): the demo answers from the documents, which do not name Paris
    answer = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
    assert len(answer.split()) >= 3, answer


def test_generate_openai_sdk_and_stream_agree(vllm):
    from openai import OpenAI

    body = httpx.get(vllm + "/generate", params={"prompt": PROMPTS[0], "temperature": 0, "max_new_tokens": 20,
                                                 "rag": False}, headers=AUTH, timeout=300).json()
    assert "Paris" in body["generated_text"] and body["finish_reason"] in ("stop", "length")
    client = OpenAI(base_url=vllm + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    reply = client.chat.completions.create(model="magic-conch", messages=messages, temperature=0, max_tokens=20,
                                           extra_body={"rag": False})
    assert reply.choices[0].message.content == body["generated_text"]
    assert reply.usage.completion_tokens == body["usage"]["completion_tokens"] <= 20
    stream = client.chat.completions.create(model="magic-conch", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"rag": False})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == reply.choices[0].message.content
    assert finish == reply.choices[0].finish_reason and usage.completion_tokens == reply.usage.completion_tokens


def test_greedy_answers_agree_with_the_builtin_engine(servers):
    vllm_url, builtin_url = servers

    async def answers(url):
        # no more at once than may wait (--max_queue 2): under load the engine may not have taken the
        # earlier ones into its batch yet when the next arrive, and a third waiting one would get 503
        slots = asyncio.Semaphore(2)

        async def one(client, prompt):
            async with slots:
                r = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 32,
                    "rag": False})
            assert r.status_code == 200, f"{url}: {r.status_code} {r.text}"
            return r.json()["choices"][0]["message"]["content"]

        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    ours, theirs = asyncio.run(answers(vllm_url)), asyncio.run(answers(builtin_url))
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"greedy answers identical on both engines: {same}/{len(PROMPTS)}")
    for p, a, b in zip(PROMPTS, ours, theirs):
        if a != b:
            print(f"  {p!r}\n    vllm:    {a!r}\n    builtin: {b!r}")
    assert "Paris" in ours[0] and "Paris" in theirs[0]
    assert same >= len(PROMPTS) // 2, (ours, theirs)  # fp32 kernels differ in the last digits, so a tie may flip


def test_the_same_4xx_sentences_on_both_engines(servers):
    cases = [
        {},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 5},
        {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
        {"messages": [{"role": "user", "content": "hi"}], "tools": []},
        {"messages": [{"role": "system", "content": "only a system prompt"}]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]},
        {"messages": [{"role": "user", "content": "hi"}] * 5},
        {"messages": [{"role": "user", "content": "x" * 401}]},
    ]
    for body in cases:
        got = []
        for url in servers:
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)
            got.append((r.status_code, r.json()["error"]["message"]))
        assert got[0] == got[1], (body, got)
        status, message = got[0]
        assert 400 <= status < 500 and message.endswith(".") and "\n" not in message, (body, got)
    for url in servers:
        assert httpx.get(url + "/generate", headers=AUTH).status_code == 400


def test_rag_sources_on_vllm(servers):
    question = {"messages": [{"role": "user", "content": "本周有什么特价？"}], "max_tokens": 8, "temperature": 0}
    bodies = [httpx.post(url + "/v1/chat/completions", json=question, headers=AUTH, timeout=300).json()
              for url in servers]
    assert bodies[0]["sources"] and bodies[0]["sources"] == bodies[1]["sources"]
    with httpx.stream("POST", servers[0] + "/v1/chat/completions", json={**question, "stream": True},
                      headers=AUTH, timeout=300) as r:
        first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: {"))[6:])
    assert first["sources"] == bodies[0]["sources"]


def test_stop_length_n_seed_and_logprobs(vllm):
    stopped = ask(vllm, PROMPTS[0], stop=["Paris"]).json()
    assert (stopped["choices"][0]["finish_reason"] == "stop"
            and "Paris" not in stopped["choices"][0]["message"]["content"])
    short = ask(vllm, PROMPTS[3], max_tokens=3).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    sampled = {"temperature": 1.0, "seed": 42, "n": 2, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    one, two = ask(vllm, "Name a sea animal.", **sampled).json(), ask(vllm, "Name a sea animal.", **sampled).json()
    assert [c["message"]["content"] for c in one["choices"]] == [c["message"]["content"] for c in two["choices"]]
    for choice in one["choices"]:
        entries = choice["logprobs"]["content"]
        assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
    assert one["usage"]["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in one["choices"])


def test_a_client_that_leaves_stops_its_generation(vllm):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
            "max_tokens": 256, "stream": True, "temperature": 0.8, "rag": False}
    with httpx.stream("POST", vllm + "/v1/chat/completions", json=body, headers=AUTH, timeout=300) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # the first words came: hang up
    with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gave up
        httpx.post(vllm + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH,
                   timeout=httpx.Timeout(60, read=2))
    deadline = time.time() + 10
    while httpx.get(vllm + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(vllm + "/health").json()["running"] == 0
    assert 'conch_requests_total{finish_reason="cancelled"}' in httpx.get(vllm + "/metrics").text


def test_full_queue_answers_503(vllm):
    """4 running + 2 waiting: of 10 requests at once, the last ones are refused with Retry-After."""
    ask_long = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 64,
                "temperature": 1.0, "rag": False}

    async def run():
        async with httpx.AsyncClient(base_url=vllm, headers=AUTH, timeout=600) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=ask_long) for _ in range(10)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 6 and codes.count(503) == 4, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "2" and "busy" in busy.json()["error"]["message"]



def test_r1_reasoning_split_and_timeout_on_vllm(tiny_r1):
    """R1's think block goes to reasoning_content on vLLM as on the built-in engine, plain and streamed,
    and a generation that outlives --request_timeout_s is aborted with 504 and the same sentence."""
    with vllm_server(tiny_r1, "--api_key", KEY, "--request_timeout_s", "1") as url:
        ask = {"messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": 6, "temperature": 0}
        r = httpx.post(url + "/v1/chat/completions", json=ask, headers=AUTH, timeout=120)
        message = r.json()["choices"][0]["message"]
        # R1's prompt opens <think>; the random tiny model never closes it: all of it is reasoning
        assert message["content"] == "" and message["reasoning_content"]
        assert message["reasoning"] == message["reasoning_content"]
        with httpx.stream("POST", url + "/v1/chat/completions", json={**ask, "stream": True}, headers=AUTH,
                          timeout=120) as r:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in r.iter_lines()
                      if line.startswith("data: {")]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == message["reasoning_content"]
        assert not "".join(d.get("content") or "" for d in deltas)
        generated = httpx.get(url + "/generate", params={"prompt": "你是谁？", "max_new_tokens": 6, "temperature": 0},
                              headers=AUTH, timeout=120).json()
        assert generated["generated_text"] == "" and generated["reasoning"] == message["reasoning_content"]

        slow = {**ask, "max_tokens": 900}  # greedy: the random model loops without an end token
        r = httpx.post(url + "/v1/chat/completions", json=slow, headers=AUTH, timeout=120)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["message"] == "the request took longer than its 1 s timeout."
        assert httpx.get(url + "/health").json()["running"] == 0

# ---------------------------------------------------------------------------------------------
# conch.serving.engine_vllm without vLLM: its generations against a stand-in for vLLM's AsyncLLM


class FakeLLM:
    """Yields vLLM-shaped delta outputs: 'Hi', ' there', then the end token (finish_reason stop)."""

    def __init__(self, pause=0.0):
        self.pause, self.aborted = pause, []

    async def generate(self, prompt, params, request_id):
        from types import SimpleNamespace as NS

        lp = lambda t: {t: NS(logprob=-0.5, rank=1), 99: NS(logprob=-1.5, rank=2)}  # noqa: E731
        steps = [("Hi", [5], None), (" there", [6], None), ("", [2], "stop")]
        try:
            for text, ids, finish in steps:
                await asyncio.sleep(self.pause)
                out = NS(text=text, token_ids=ids, logprobs=[lp(i) for i in ids], finish_reason=finish,
                         stop_reason=None)
                yield NS(outputs=[out], finished=finish is not None)
        except asyncio.CancelledError:
            self.aborted.append(request_id)  # vLLM's generate() aborts the request here
            raise


def fake_engine(llm, max_batch_size=1, max_queue=1):
    """A `VLLMEngine` around the stand-in, built the way `VLLMEngine.from_model` builds one around vLLM's."""
    from conch.serving.engine_vllm import VLLMEngine

    class Engine(VLLMEngine):
        def sampling_params(self, params):  # vLLM's SamplingParams need vllm: the stand-in takes conch's
            return params

    return Engine(llm, max_batch_size, max_queue, defaults={}, sampling=(0.0, 1.0))


def test_vllm_generation_events_outcome_and_queue_limit():
    from conch.serving.engine import QueueFull
    from conch.serving.sampling import SamplingParams

    async def main():
        engine = fake_engine(FakeLLM())
        gen = engine.generate([1, 2, 3], SamplingParams(logprobs=True, top_logprobs=1), 30)
        engine.generate([1], SamplingParams(), 30)  # one running, one waiting: the third is refused
        with pytest.raises(QueueFull):
            engine.generate([1], SamplingParams(), 30)
        assert (engine.active, engine.queue_depth) == (1, 1)
        events = [e async for e in gen]
        return engine, events

    engine, events = asyncio.run(main())
    assert "".join(e.text for e in events) == "Hi there"
    outcome = events[-1].outcome
    # the end token is not counted, nor its logprob sent: as the built-in engine does
    assert (outcome.finish_reason, outcome.prompt_tokens, outcome.completion_tokens) == ("stop", 3, 2)
    assert [entry for e in events for entry in e.logprobs] == [(5, -0.5, [(5, -0.5)]), (6, -0.5, [(6, -0.5)])]
    assert engine.sampling_defaults(None, None) == {"temperature": None, "top_p": 1.0}  # greedy, as the built-in
    assert engine.sampling_defaults(0, 0.9) == {"temperature": None, "top_p": 0.9}


def test_vllm_generation_cancel_and_timeout_abort_the_request():
    from conch.serving.sampling import SamplingParams

    async def main():
        llm = FakeLLM(pause=0.2)
        engine = fake_engine(llm, max_batch_size=4)
        early = engine.generate([1], SamplingParams(), 30)
        early.cancel()  # before vLLM ever saw it
        gone = engine.generate([1], SamplingParams(), 30)
        slow = engine.generate([1], SamplingParams(), 0.1)
        await asyncio.sleep(0.3)
        gone.cancel()
        outcomes = []
        for g in (early, gone, slow):
            outcomes.append([e async for e in g][-1].outcome)
        return llm, engine, outcomes

    llm, engine, outcomes = asyncio.run(main())
    assert [o.finish_reason for o in outcomes] == ["cancelled", "cancelled", "timeout"]
    assert len(llm.aborted) == 2 and engine.running == set()
