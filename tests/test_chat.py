import pytest
import torch

from conch import chat, hub
from conch.errors import ConchError


@pytest.mark.parametrize("text, opened, reasoning, answer", [
    ("let me think</think>\n\n我是神奇海螺", True, "let me think", "我是神奇海螺"),  # R1: prompt opened it
    ("<think>\nhmm\n</think>\n\nParis.", False, "hmm", "Paris."),  # the model wrote both tags
    ("still thinking and out of tokens", True, "still thinking and out of tokens", ""),  # unclosed
    ("<think>never closed", False, "never closed", ""),  # unclosed, tag in the text
    ("Paris.", False, "", "Paris."),  # no think at all
    ("\n</think>\n\nParis.", True, "", "Paris."),  # trained without reasoning: empty think
])
def test_split_reasoning(text, opened, reasoning, answer):
    assert chat.split_reasoning(text, opened) == (reasoning, answer)


def test_max_new_tokens_counts_only_new_tokens(tiny_r1):
    model, tok = hub.load_model(tiny_r1)
    long_question = "美味蟹堡 " * 60
    reply = chat.generate(model, tok, long_question, chat.GenConfig(max_new_tokens=5, temperature=0))
    assert reply.prompt_tokens > 50  # max_length=5 would have left no room at all
    assert reply.completion_tokens == 5 and reply.finish_reason == "length"


def test_only_the_new_text_comes_back(tiny_r1):
    model, tok = hub.load_model(tiny_r1)
    question = "Who are you? Tell me about the Krusty Krab."
    reply = chat.generate(model, tok, question, chat.GenConfig(max_new_tokens=8, temperature=0))
    prompt = chat.render_prompt(tok, chat.to_messages(question))
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.text == expected and question not in reply.text


def test_r1_prompt_opens_think_so_output_starts_as_reasoning(tiny_r1):
    model, tok = hub.load_model(tiny_r1)
    reply = chat.generate(model, tok, "hi", chat.GenConfig(max_new_tokens=4, temperature=0))
    # the random model never closes the think block: everything is (unfinished) reasoning
    assert reply.answer == "" and reply.reasoning == reply.text.strip()


def test_batch_equals_one_by_one(demo):
    model, tok = demo
    questions = ["What is the capital of France?", "Name a colour.", "What do bees make? Answer in one word."]
    gen = chat.GenConfig(max_new_tokens=12, temperature=0)
    batched = chat.generate(model, tok, questions, gen)
    single = [chat.generate(model, tok, q, gen) for q in questions]
    assert [r.text for r in batched] == [r.text for r in single]
    assert "Paris" in batched[0].answer


def test_stream_matches_generate(demo):
    model, tok = demo
    gen = chat.GenConfig(max_new_tokens=12, temperature=0)
    streamed = "".join(chat.stream(model, tok, "What is the capital of France?", gen))
    assert streamed.strip() == chat.generate(model, tok, "What is the capital of France?", gen).text


def test_stop_strings_cut_the_answer(demo):
    model, tok = demo
    gen = chat.GenConfig(max_new_tokens=20, temperature=0, stop=["Paris"])
    reply = chat.generate(model, tok, "What is the capital of France?", gen)
    assert "Paris" not in reply.text and reply.finish_reason == "stop"


def test_sampling_defaults_come_from_the_model(tiny_r1):
    model, tok = hub.load_model(tiny_r1)
    assert chat.sampling_kwargs(model, tok, chat.GenConfig()) == {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    assert chat.sampling_kwargs(model, tok, chat.GenConfig(temperature=0))["do_sample"] is False


@pytest.mark.parametrize("config, reasoning, expected", [
    ({"do_sample": True, "temperature": 0.7, "top_p": 0.8}, False, (0.7, 0.8)),  # the file says so
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95}, True, (0.6, 0.95)),  # R1's own file
    ({}, True, chat.R1_SAMPLING),  # a reasoning model whose file says nothing: DeepSeek's recommendation
    ({"temperature": 0.9}, False, (0.0, 1.0)),  # no do_sample: greedy, as transformers' generate
    ({}, False, (0.0, 1.0)),  # the demo's file
])
def test_one_sampling_rule(config, reasoning, expected):
    assert chat.model_sampling(config, reasoning) == expected


def test_the_budget_follows_the_model(demo, r1_real_tokenizers):
    _, demo_tok = demo
    assert chat.budget(demo_tok, 60) == 60  # answers at once
    for tok in r1_real_tokenizers.values():  # both template revisions: room to think first
        assert chat.budget(tok, 60) == 60 + chat.THINK_TOKENS >= 1024
        assert chat.new_token_limit(chat.GenConfig(answer_tokens=60), tok) == 60 + chat.THINK_TOKENS
        assert chat.new_token_limit(chat.GenConfig(max_new_tokens=7, answer_tokens=60), tok) == 7  # explicit wins
    assert chat.new_token_limit(chat.GenConfig(), demo_tok) == chat.GenConfig().answer_tokens


def test_bad_max_new_tokens(tiny_r1):
    model, tok = hub.load_model(tiny_r1)
    with pytest.raises(ConchError, match="max_new_tokens"):
        chat.generate(model, tok, "hi", chat.GenConfig(max_new_tokens=0))


def test_load_rejects_a_folder_that_is_not_an_adapter(tiny_r1, tmp_path):
    with pytest.raises(ConchError, match="adapter_config.json"):
        chat.load(tiny_r1, adapter=tmp_path)


# ---------------------------------------------------------------------------------------------
# DeepSeek-R1-Distill's real tokenizer (tests/r1_tokenizer.py) on a tiny random Qwen2


def force(model, monkeypatch, ids):
    """Make model.generate write exactly `ids` (then stop), through the real generate loop."""
    original = model.generate

    def generate(**kwargs):
        start = kwargs["input_ids"].shape[1]
        return original(**kwargs,
                        prefix_allowed_tokens_fn=lambda _, sofar: [ids[min(len(sofar) - start, len(ids) - 1)]])

    monkeypatch.setattr(model, "generate", generate)


def test_real_r1_streamed_chinese_decodes_cleanly(r1_real, monkeypatch):
    """Chinese and emoji span several byte-level tokens: no piece may carry a half character."""
    model, tok = r1_real
    answer = "我是神奇海螺🐚，蟹堡王的智能助手！美味蟹堡 2.99 贝壳币。"
    written = "\n</think>\n\n" + answer
    ids = tok(written, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are parts of one character
    force(model, monkeypatch, ids)
    gen = chat.GenConfig(max_new_tokens=64, temperature=0)
    pieces = list(chat.stream(model, tok, "你是谁？", gen))
    assert "".join(pieces) == written and not any("\ufffd" in p for p in pieces)
    reply = chat.generate(model, tok, "你是谁？", gen)
    assert (reply.reasoning, reply.answer, reply.finish_reason) == ("", answer, "stop")
    assert reply.completion_tokens == len(ids) - 1  # the EOS ends it and is not counted as text


def test_real_r1_answer_cut_while_thinking_is_length_and_empty(r1_real):
    model, tok = r1_real
    reply = chat.generate(model, tok, "1+1?", chat.GenConfig(max_new_tokens=6, temperature=0))
    # the 9 prompt tokens: BOS <｜User｜> 1 + 1 ? <｜Assistant｜> <think> \n
    assert reply.finish_reason == "length" and reply.answer == "" and reply.prompt_tokens == 9
    assert reply.cut_while_thinking
    assert chat.sampling_kwargs(model, tok, chat.GenConfig()) == {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
