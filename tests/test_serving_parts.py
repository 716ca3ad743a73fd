"""The serving pieces without a model: the KV batch's tensor surgery (`conch.serving.kv_batch`), a request
turning its tokens into events (`conch.serving.engine.Request.advance`), and the response bodies
(`conch.serving.responses`). tests/test_engine.py checks them together against transformers on a real model."""

from types import SimpleNamespace

import torch

from conch.serving.engine import Event, Outcome, Request
from conch.serving.kv_batch import KVBatch, pad_left
from conch.serving.responses import ChunkStream, completion_body, finished_choices
from conch.serving.sampling import SamplingParams


class FakeCache:
    """What KVBatch needs of transformers' DynamicCache: ``layers`` with keys and values, and row selection."""

    def __init__(self, *layers):
        self.layers = [SimpleNamespace(keys=k, values=k + 100) for k in layers]

    def batch_select_indices(self, index):
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]


def kv(mask_rows, heads=1, dim=2):
    """A KVBatch whose keys at (row, column) hold 10 * row + column + 1 where the mask is 1, else 0."""
    mask = torch.tensor(mask_rows)
    rows, width = mask.shape
    keys = torch.zeros((rows, heads, width, dim))
    for r in range(rows):
        for c in range(width):
            keys[r, :, c, :] = (10 * r + c + 1) * mask[r, c]
    return KVBatch(FakeCache(keys), mask, mask.sum(-1), torch.arange(rows, dtype=torch.float)[:, None])


class FakeModel:
    """Records its calls; the logits' last position is the call's position ids (so a test can tell)."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, **kw):
        self.calls.append(kw)
        positions = kw["position_ids"].float()
        return SimpleNamespace(logits=positions[:, :, None].expand(-1, -1, 3))


def test_pad_left():
    t = torch.tensor([[1, 2]])
    assert pad_left(t, 0, 1) is t
    assert pad_left(t, 2, 1).tolist() == [[0, 0, 1, 2]]
    assert pad_left(t, 1, 0).tolist() == [[0, 0], [1, 2]]


def test_join_pads_the_narrower_batch_on_the_left():
    running, new = kv([[0, 1, 1], [1, 1, 1]]), kv([[1, 1, 1, 1, 1]])
    running.join(new)
    assert running.width == 5
    assert running.mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = running.cache.layers[0].keys[:, 0, :, 0]
    assert keys.tolist() == [[0, 0, 0, 2, 3], [0, 0, 11, 12, 13], [1, 2, 3, 4, 5]]
    assert running.cache.layers[0].values[2, 0, :, 0].tolist() == [101, 102, 103, 104, 105]
    assert running.lengths.tolist() == [2, 3, 5] and running.next_logits[:, 0].tolist() == [0, 1, 0]
    wider = kv([[1, 1]])  # and the other way round: the newcomer is the narrower one
    wider.join(kv([[1]]))
    assert wider.mask.tolist() == [[1, 1], [0, 1]]


def test_keep_selects_rows_and_trims_columns_only_padding_needs():
    batch = kv([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    batch.keep(torch.tensor([0, 1]))  # the widest row leaves: column 0 is padding for both that stay
    assert batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]] and batch.lengths.tolist() == [2, 3]
    assert batch.cache.layers[0].keys[:, 0, :, 0].tolist() == [[0, 3, 4], [12, 13, 14]]
    batch.keep(torch.tensor([1]))
    assert batch.width == 3  # no column is padding for the one row left: nothing to trim
    batch.keep(torch.tensor([0]))
    assert batch.mask.tolist() == [[1, 1, 1]]


def test_prefill_left_pads_and_decode_appends_one_column():
    model = FakeModel()
    batch = KVBatch.prefill(model, [[5, 6], [7, 8, 9]], pad_id=0)
    call = model.calls[0]
    assert call["input_ids"].tolist() == [[0, 5, 6], [7, 8, 9]]
    assert call["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert call["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]] and call["use_cache"]
    assert batch.lengths.tolist() == [2, 3] and batch.next_logits[:, 0].tolist() == [1, 2]
    batch.decode(model, torch.tensor([11, 12]))
    call = model.calls[1]
    assert call["input_ids"].tolist() == [[11], [12]] and call["position_ids"].tolist() == [[2], [3]]
    assert batch.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]] and batch.lengths.tolist() == [3, 4]
    assert batch.next_logits[:, 0].tolist() == [2, 3] and call["past_key_values"] is batch.cache


PIECES = {1: "Hel", 2: "lo ", 3: "ST", 4: "OP", 5: "!"}
EOS = {0}


def request(**params):
    events = []
    r = Request([9, 9, 9], SamplingParams(**params), on_event=events.append)
    r.detokenizer = SimpleNamespace(add=PIECES.__getitem__, flush=lambda: "")
    return r, events


def feed(r, tokens):
    logits = torch.zeros(6)
    return [r.advance(t, logits, EOS) for t in tokens]


def test_a_stop_string_split_over_tokens_is_held_back_then_cut():
    r, events = request(max_tokens=10, stop=["STOP"])
    assert feed(r, [1, 2, 3, 4]) == [True, True, True, False]
    assert "".join(e.text for e in events) == r.text == "Hello "
    assert [e.text for e in events[:-1]] == ["Hel", "lo "]  # "ST" was held back: it could start "STOP"
    assert events[-1].outcome == Outcome("stop", 3, 4) and r.outcome is events[-1].outcome


def test_end_token_length_and_cancel():
    r, events = request(max_tokens=10)
    assert feed(r, [1, 0]) == [True, False]
    assert r.tokens == [1] and events[-1].outcome.finish_reason == "stop"  # the end token is not counted
    assert events[-1].outcome.completion_tokens == 1
    r, events = request(max_tokens=2)
    assert feed(r, [1, 2]) == [True, False] and r.outcome.finish_reason == "length" and r.text == "Hello "
    r, events = request(max_tokens=10)
    r.cancel()
    assert feed(r, [1]) == [False] and r.tokens == [] and r.outcome.finish_reason == "cancelled"
    r.end("stop")  # once only
    assert [e.outcome.finish_reason for e in events if e.outcome] == ["cancelled"]


def test_logprobs_ride_with_the_text_they_belong_to():
    r, events = request(max_tokens=10, logprobs=True, top_logprobs=1, stop=["STOP"])
    feed(r, [1, 3, 5])  # "ST" is held back with its logprob until "!" shows it was no stop string
    assert [len(e.logprobs) for e in events] == [1, 2]
    assert [entry[0] for e in events for entry in e.logprobs] == [1, 3, 5]


def test_chunk_stream_splits_reasoning_and_counts_usage():
    stream = ChunkStream("conch", 2, opened_think=True, logprobs=None)
    first = stream.first([{"id": "menu.md#0"}])
    assert first["sources"] == [{"id": "menu.md#0"}] and [c["index"] for c in first["choices"]] == [0, 1]
    chunks = stream.chunks(0, Event("hmm</think>\n\nHi"))
    chunks += stream.chunks(0, Event("!", outcome=Outcome("stop", 7, 3)))
    chunks += stream.chunks(1, Event("x", outcome=Outcome("length", 7, 4)))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == 0]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hmm"
    assert "".join(d.get("content", "") for d in deltas) == "Hi!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop", "length"]
    assert {c["id"] for c in chunks} == {first["id"]}
    assert stream.usage()["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    error = stream.chunks(1, Event(outcome=Outcome("timeout", message="too slow.")))
    assert error == [{"error": {"message": "too slow.", "type": "server_error", "code": 504}}]


def test_finished_choices_and_completion_body():
    outcomes = [Outcome("stop", 5, 2), Outcome("length", 5, 3)]
    choices = finished_choices(["<think>a</think>b", "c"], [[1], [2]], outcomes, False, lambda e: {"n": len(e)})
    assert [(c["reasoning"], c["answer"], c["logprobs"]) for c in choices] == [("a", "b", {"n": 1}),
                                                                             ("", "c", {"n": 1})]
    body = completion_body(choices, None, "conch")
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"] and body["model"] == "conch"
    assert finished_choices(["c"], [[]], outcomes[:1], False, None)[0]["logprobs"] is None
