"""The engine, the sampler, the reasoning parser and the service, in-process on the tiny R1 model."""

import asyncio
import queue
import time
from types import SimpleNamespace

import pytest
import torch

from conch import hub
from conch.serving.engine import Engine, Outcome, Request
from conch.serving.protocol import ChatRequest
from conch.reasoning import ReasoningStream, cut_at_stop, held_back, split_reasoning
from conch.serving.sampling import Detokenizer, SamplingParams, apply_penalties
from conch.serve import ServeConfig
from conch.serving.service import ChatService, outcome_error


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


# ---------------------------------------------------------------------------------------------
# Parity (issue 26): greedy, the hand-written engine must give what transformers gives. The
# prompts differ in length on purpose: left padding, joining caches and dropping rows are where
# a continuous-batching engine goes wrong. `start=False` engines are driven step by step, so the
# moment a request joins or leaves is exact, not a race with the worker thread.

QUESTIONS = {  # prompt lengths on the tiny tokenizer: 7, 12, 15 and 37 tokens
    "short": "hi",
    "medium": "What is the capital of France?",
    "zh": "你是谁？",
    "long": "美味蟹堡的做法是什么？请详细说明，谢谢！",
}


def solo(tiny, prompt_ids, max_new_tokens):
    """transformers' own greedy `model.generate`, one prompt, no padding: the new tokens up to an end token."""
    from conch import chat

    model, tok = tiny
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids], device=model.device),
                             attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long, device=model.device),
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    row = out[0, len(prompt_ids):].tolist()
    eos = set(chat.eos_ids(model, tok))
    return row[:next((i for i, t in enumerate(row) if t in eos), len(row))]


def greedy(max_tokens):
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def drive(engine, requests=(), steps=None):
    """Admit `requests` (one prefill) into the running batch, then decode `steps` steps (None: until empty)."""
    if requests:
        engine.admit(list(requests))
    n = 0
    while engine.running and (steps is None or n < steps):
        engine.step()
        n += 1
    return n


@pytest.fixture
def driven(tiny):
    """An engine without its worker thread: the test calls `admit` and `step`."""
    engine = Engine(*tiny, max_batch_size=8, max_queue=16, start=False)
    yield engine
    engine.shutdown()


def test_prompts_have_different_lengths(tiny):
    """The parity tests below rely on prompts of different lengths (else nothing is padded)."""
    lengths = {name: len(prompt(tiny, q)) for name, q in QUESTIONS.items()}
    assert len(set(lengths.values())) == len(lengths), lengths




@pytest.mark.parametrize("name", list(QUESTIONS))
def test_one_request_equals_model_generate(tiny, engine, name):
    """A single request through the engine (worker thread, batch of one) gives, token for token,
    transformers' greedy `model.generate` on the same prompt ids, and ends for the same reason."""
    ids, n = prompt(tiny, QUESTIONS[name]), 40
    request, events = run(engine, ids, greedy(n))
    text, outcome = finish(request, events)
    expected = solo(tiny, ids, n)
    assert request.tokens == expected
    assert outcome.ok and outcome.completion_tokens == len(expected)
    assert outcome.finish_reason == ("length" if len(expected) == n else "stop")
    assert text == request.text  # the events carry the whole text


@pytest.mark.parametrize("name", [
    "short", "medium", "zh", "long"])
def test_one_request_text_equals_chat_generate(tiny, engine, name):
    """The engine's text (what the events carry) equals `chat.generate`'s, and so do the reasoning
    and the answer split from it: the server and the notebooks show the same answer. ("medium"'s
    40 tokens end with '海' + half a character, on the tiny model in float32: the '海' must not be lost.)"""
    from conch import chat
    from conch.reasoning import prompt_opens_think

    model, tok = tiny
    ids, n = prompt(tiny, QUESTIONS[name]), 40
    text, outcome = finish(*run(engine, ids, greedy(n)))
    reply = chat.generate(model, tok, QUESTIONS[name], chat.GenConfig(max_new_tokens=n, temperature=0))
    assert text == reply.text == tok.decode(solo(tiny, ids, n), skip_special_tokens=True).rstrip("\ufffd")
    opened = prompt_opens_think(chat.render_prompt(tok, [{"role": "user", "content": QUESTIONS[name]}]))
    assert (reply.reasoning, reply.answer) == split_reasoning(text, opened)


def test_complete_characters_before_a_cut_partial_character_are_kept(tiny, driven, monkeypatch):
    """Text the detokenizer holds back (a partial character) is flushed when the request ends, minus
    the partial character itself; independent of the random weights: the sampler is made to
    pick one token that decodes to a whole character plus the first byte of the next, and
    max_tokens=1 cuts there. The whole character must reach the text; only the half one is dropped."""
    _, tok = tiny
    token = next(i for i in range(len(tok)) if (s := tok.decode([i])).endswith("\ufffd") and s.rstrip("\ufffd"))
    monkeypatch.setattr("conch.serving.engine.sample", lambda logits, params, generators: torch.tensor([token]))
    request = Request(prompt(tiny), greedy(1))
    drive(driven, [request])
    assert request.tokens == [token] and request.outcome.finish_reason == "length"
    assert request.text == tok.decode([token]).rstrip("\ufffd") != ""


def test_a_batch_started_together_equals_solo_runs(tiny, driven):
    """Four prompts of four lengths prefilled together (left-padded) each give their solo output."""
    requests = [Request(prompt(tiny, q), greedy(30)) for q in QUESTIONS.values()]
    drive(driven, requests)
    for r in requests:
        assert r.outcome.ok and r.tokens == solo(tiny, r.prompt_ids, 30), r.prompt_ids


@pytest.mark.parametrize("newcomer", ["long", "zh"])
def test_a_request_admitted_into_a_running_batch_equals_its_solo_run(tiny, driven, newcomer):
    """A request joining a batch that is already decoding (its cache joined to theirs, padded on
    whichever side is shorter: "long" is wider than the running cache, "zh" narrower) gives its
    solo output, and the running requests' outputs are not changed by it."""
    running = [Request(prompt(tiny, QUESTIONS[q]), greedy(40)) for q in ("short", "medium")]
    drive(driven, running, steps=6)
    assert [len(r.tokens) for r in running] == [6, 6] and all(r.outcome is None for r in running)
    width = driven.batch.width
    late = Request(prompt(tiny, QUESTIONS[newcomer]), greedy(20))
    assert (len(late.prompt_ids) > width) == (newcomer == "long")  # both sides of the join are covered
    drive(driven, [late])
    assert late.outcome.ok and late.tokens == solo(tiny, late.prompt_ids, 20)
    for r in running:
        assert r.outcome.ok and r.tokens == solo(tiny, r.prompt_ids, 40)


def test_requests_admitted_at_different_steps_all_equal_their_solo_runs(tiny, driven):
    """Three admissions at three different moments (two of them while others run) and one
    request leaving in between: every output equals its solo output."""
    first = Request(prompt(tiny, QUESTIONS["medium"]), greedy(40))
    second = [Request(prompt(tiny, QUESTIONS["long"]), greedy(8)),
              Request(prompt(tiny, QUESTIONS["short"]), greedy(40))]
    third = Request(prompt(tiny, QUESTIONS["zh"]), greedy(25))
    drive(driven, [first], steps=3)
    drive(driven, second, steps=10)  # the "long" one (8 tokens) has left
    assert second[0].outcome is not None and first.outcome is None
    drive(driven, [third])
    for r in [first, *second, third]:
        assert r.outcome.ok and r.tokens == solo(tiny, r.prompt_ids, r.params.max_tokens), r.prompt_ids


def test_requests_leaving_mid_batch_do_not_change_the_others(tiny, driven):
    """Four requests with max_tokens 5, 12, 30, 20: the short ones leave first (their rows leave the
    cache, and the padding columns nobody needs any more are trimmed); every output, the survivors'
    included, equals its solo output. The longest prompt leaves first, so the trim has work to do."""
    plan = [("long", 5), ("medium", 12), ("short", 30), ("zh", 20)]
    requests = [Request(prompt(tiny, QUESTIONS[q]), greedy(n)) for q, n in plan]
    driven.admit(requests)
    width = driven.batch.width
    drive(driven, steps=5)
    assert [r.outcome is not None for r in requests] == [True, False, False, False]
    assert driven.batch.width < width + 5  # the long prompt's padding columns were dropped
    drive(driven)
    for r, (q, n) in zip(requests, plan):
        assert r.outcome.finish_reason == "length" and r.tokens == solo(tiny, r.prompt_ids, n), q


def test_a_request_cancelled_mid_batch_does_not_change_the_others(tiny, driven):
    """`Request.cancel()` while it is decoding in a batch of three: it leaves at the next step as
    ``cancelled`` with what it had (a prefix of its solo output), and the others still equal their
    solo outputs."""
    requests = [Request(prompt(tiny, QUESTIONS[q]), greedy(30)) for q in ("zh", "long", "short")]
    drive(driven, requests, steps=7)
    requests[1].cancel()  # the middle row, with the widest prompt
    drive(driven)
    cancelled = requests[1]
    assert cancelled.outcome.finish_reason == "cancelled" and len(cancelled.tokens) == 7
    assert cancelled.tokens == solo(tiny, cancelled.prompt_ids, 30)[:7]
    for r in (requests[0], requests[2]):
        assert r.outcome.ok and r.tokens == solo(tiny, r.prompt_ids, 30)


def test_worker_admits_and_cancels_while_a_batch_runs(tiny, engine):
    """The same through the worker thread and `Generation`-style callbacks, without sleeping: the
    first request's own event callback (run by the worker between steps) submits a newcomer and
    cancels a neighbour, so the newcomer joins, and the neighbour leaves, a batch that is running."""
    ids = {q: prompt(tiny, QUESTIONS[q]) for q in ("short", "medium", "long", "zh")}
    events = {q: queue.Queue() for q in ids}
    seen = {}

    def on_first(event):
        events["medium"].put(event)
        if "admitted" not in seen and len(first.tokens) >= 4:
            seen["admitted"] = [len(r.tokens) for r in (first, neighbour)]
            seen["late"] = engine.add(Request(ids["long"], greedy(20), on_event=events["long"].put))
            neighbour.cancel()

    first = Request(ids["medium"], greedy(40), on_event=on_first)
    neighbour = Request(ids["zh"], greedy(40), on_event=events["zh"].put)
    third = Request(ids["short"], greedy(40), on_event=events["short"].put)
    for r in (first, neighbour, third):
        engine.add(r)
    results = {q: finish(None, events[q]) for q in ("medium", "zh", "short")}
    assert seen["admitted"][0] < 40 and seen["admitted"][1] < 40  # both were still running
    results["long"] = finish(None, events["long"])
    assert results["zh"][1].finish_reason == "cancelled"
    assert neighbour.tokens == solo(tiny, ids["zh"], 40)[:len(neighbour.tokens)]
    assert results["zh"][0] == neighbour.text
    late = seen["late"]
    for q, n, r in (("medium", 40, first), ("short", 40, third), ("long", 20, late)):
        text, outcome = results[q]
        assert outcome.ok and r.tokens == solo(tiny, ids[q], n), q
        assert outcome.completion_tokens == len(r.tokens) and text == r.text, q  # the events carry it all
