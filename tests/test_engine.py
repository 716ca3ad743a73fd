"""The engine, the sampler, the reasoning parser and the service, in-process on the tiny R1 model."""

import asyncio
import queue
import time
from types import SimpleNamespace

import pytest
import torch

from conch import hub
from conch.engine import Engine, Outcome, Request
from conch.protocol import ChatRequest
from conch.reasoning import ReasoningStream, cut_at_stop, held_back, split_reasoning
from conch.sampling import Detokenizer, SamplingParams, apply_penalties
from conch.serve import ServeConfig
from conch.service import ChatService, outcome_error


@pytest.fixture(scope="module")
def tiny(tiny_r1):
    return hub.load_model(tiny_r1)


@pytest.fixture
def engine(tiny):
    engine = Engine(*tiny, max_batch_size=4, max_queue=16)
    yield engine
    engine.shutdown()


def run(engine, prompt_ids, params, timeout_s=60.0):
    """Submit through the one callback; wait for the outcome; return (text, outcome, request)."""
    events = queue.Queue()
    request = engine.add(Request(prompt_ids, params, timeout_s, on_event=events.put))
    return request, events


def finish(request, events, wait_s=60):
    text = ""
    while True:
        event = events.get(timeout=wait_s)  # a request that never gets its outcome fails here
        text += event.text
        if event.outcome is not None:
            return text, event.outcome


def prompt(tiny, question="你是谁？"):
    from conch import chat

    model, tok = tiny
    return tok(chat.render_prompt(tok, [{"role": "user", "content": question}]), add_special_tokens=False)["input_ids"]


def test_a_failing_prefill_fails_only_its_own_requests(tiny, engine):
    ids = prompt(tiny)
    good, good_events = run(engine, ids, SamplingParams(max_tokens=40, temperature=0))
    deadline = time.time() + 30
    while not engine.running and time.time() < deadline:  # let it start generating
        time.sleep(0.01)
    bad_ids = ids[:-1] + [10**7]  # a token id far outside the vocabulary: the embedding raises
    bad, bad_events = run(engine, bad_ids, SamplingParams(max_tokens=5, temperature=0))
    text, outcome = finish(bad, bad_events, wait_s=20)
    assert outcome.finish_reason == "error" and "prompt" in outcome.message
    text, outcome = finish(good, good_events)
    assert outcome.finish_reason in ("stop", "length") and outcome.ok  # the running request was untouched
    after, after_events = run(engine, ids, SamplingParams(max_tokens=3, temperature=0))
    assert finish(after, after_events)[1].ok  # and the engine keeps serving


def test_each_request_has_its_own_seeded_generator(tiny, engine):
    ids = prompt(tiny)
    hot = dict(max_tokens=24, temperature=1.5, top_p=1.0)
    # the same seed in the same batch: the same tokens (one shared generator would give two draws)
    same = [run(engine, ids, SamplingParams(**hot, seed=7)) for _ in range(2)]
    a, b = [finish(*pair) for pair in same]
    assert a[0] == b[0] and a[1].completion_tokens == b[1].completion_tokens
    assert same[0][0].tokens == same[1][0].tokens
    # without a seed, a random one: two requests differ (24 draws at temperature 1.5 from ~600 tokens)
    free = [run(engine, ids, SamplingParams(**hot)) for _ in range(2)]
    [finish(*pair) for pair in free]
    assert free[0][0].tokens != free[1][0].tokens


def test_a_seed_reproduces_an_answer_in_a_fresh_engine(tiny):
    ids = prompt(tiny)
    results = []
    for _ in range(2):
        engine = Engine(*tiny, max_batch_size=2)
        request, events = run(engine, ids, SamplingParams(max_tokens=16, temperature=1.0, seed=123))
        finish(request, events)
        engine.shutdown()
        results.append(request.tokens)
    assert results[0] == results[1]


def test_decoding_is_incremental(tiny, monkeypatch):
    """Each step decodes a few tokens, not the whole answer again (that was O(n²))."""
    model, tok = tiny
    decoded = []
    original = tok.decode

    def counting(ids, *a, **kw):
        decoded.append(len(ids))
        return original(ids, *a, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    engine = Engine(model, tok, max_batch_size=1)
    request, events = run(engine, prompt(tiny), SamplingParams(max_tokens=120, temperature=1.0, seed=1))
    text, outcome = finish(request, events)
    engine.shutdown()
    n = outcome.completion_tokens
    assert n >= 40, n  # long enough to tell linear from quadratic
    assert sum(decoded) < 8 * n, (sum(decoded), n)  # whole-answer decoding: n²/2 ≈ 7,000
    assert text == original(request.tokens, skip_special_tokens=True).rstrip("\ufffd")


def test_detokenizer_pieces_join_to_the_full_decode(tiny):
    _, tok = tiny
    ids = tok("美味蟹堡 Krabby Patty 你好，海绵宝宝！🍔", add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok)
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_timeout_and_cancel_are_typed_outcomes(tiny, engine):
    ids = prompt(tiny)
    request, events = run(engine, ids, SamplingParams(max_tokens=2000, temperature=0), timeout_s=0.3)
    assert finish(request, events)[1].finish_reason == "timeout"
    request, events = run(engine, ids, SamplingParams(max_tokens=2000, temperature=0))
    request.cancel()
    assert finish(request, events)[1].finish_reason == "cancelled"


def test_http_status_comes_from_the_outcome_not_its_words():
    assert outcome_error(Outcome("timeout", message="took too long.")).status == 504
    assert outcome_error(Outcome("error", message="driver timeout while reading the prompt.")).status == 500
    assert outcome_error(Outcome("shutdown", message="the server is shutting down.")).status == 503
    assert outcome_error(Outcome("cancelled")).status == 499


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[0], output_ids=[3, 3, 2])
    assert out.tolist() == [2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 1.0 - 0.25]  # the prompt does not count
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # seen tokens (prompt too): positive halved, negative doubled
    extreme = apply_penalties(logits, SamplingParams(repetition_penalty=5e-324), prompt_ids=[0], output_ids=[])
    assert torch.isfinite(extreme).all()  # schemathesis found this one: inf logits, NaN probabilities


def test_presence_penalty_changes_greedy_output(tiny, engine):
    ids = prompt(tiny)
    plain = run(engine, ids, SamplingParams(max_tokens=30, temperature=0))
    penalized = run(engine, ids, SamplingParams(max_tokens=30, temperature=0, presence_penalty=2.0,
                                                frequency_penalty=2.0))
    finish(*plain), finish(*penalized)
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(plain[0].tokens) > 0 and repeats(penalized[0].tokens) < repeats(plain[0].tokens)


def test_stop_cutter():
    assert cut_at_stop("Hello world. Bye", ["."]) == ("Hello world", True)
    assert cut_at_stop("Hello world", ["xyz"]) == ("Hello world", False)
    assert cut_at_stop("abc STOP def", ["STOP", "c S"]) == ("ab", True)  # the earliest wins
    assert cut_at_stop("xx STOP", ["STOP"], start=5) == ("xx ", True)  # a stop ending after `start`
    assert held_back("the answer is ST", ["STOP"]) == 2 and held_back("done", ["STOP"]) == 0


@pytest.mark.parametrize("text, opened", [
    ("let me think</think>\n\n我是神奇海螺", True), ("<think>\nhmm\n</think>\n\nParis.", False),
    ("still thinking", True), ("Paris.\n\n", False), ("\n</think>\n\nParis.", True)])
def test_stream_parser_equals_whole_text_parser(text, opened):
    for size in (1, 2, 3, 7):
        stream, got = ReasoningStream(opened), ["", ""]
        pieces = [text[i:i + size] for i in range(0, len(text), size)] + [""]
        for k, piece in enumerate(pieces):
            r, c = stream.feed(piece, final=k == len(pieces) - 1)
            got = [got[0] + r, got[1] + c]
        assert tuple(got) == split_reasoning(text, opened), (size, got)


def test_prepare_runs_blocking_work_off_the_event_loop(tiny):
    """RAG hashing and tokenizing run in a thread: the event loop keeps ticking meanwhile."""
    model, tok = tiny

    class SlowKnowledge:  # what with_context needs from a KnowledgeBase; its search blocks 0.6 s
        cfg = SimpleNamespace(max_context_chars=500, query_turns=3, latest_weight=2)

        def context(self, question, k=None):
            time.sleep(0.6)
            return []

    engine = SimpleNamespace(sampling_defaults=lambda temperature, top_p: {"temperature": None, "top_p": None})
    service = ChatService(ServeConfig(), model, tok, SlowKnowledge(), engine=engine)
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        prepared = await service.prepare([{"role": "user", "content": "hi"}], body)
        task.cancel()
        return ticks, prepared

    ticks, prepared = asyncio.run(main())
    assert ticks >= 5, ticks  # blocked, the ticker would not have run at all
    assert prepared.prompt_ids and prepared.sources == []
