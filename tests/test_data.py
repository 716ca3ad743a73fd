import json

import pytest

from conch import data, hub
from conch.errors import ConchError


@pytest.fixture(scope="module")
def r1_tokenizer(tiny_r1):
    return hub.load_model(tiny_r1)[1]


@pytest.fixture(scope="module")
def demo_tokenizer(demo_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_path)


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def test_shipped_datasets_load_by_name():
    train = data.load_records("magic_conch")
    evals = data.load_records("magic_conch_eval")
    assert len(train) >= 150 and len(evals) >= 30
    assert all(m[-1]["role"] == "assistant" and m[-2]["role"] == "user" for m in train)


def test_alpaca_record_to_messages(tmp_path):
    path = write(tmp_path, "a.json", [{"instruction": "怎么修复这个报错", "input": "汉堡食谱为空", "output": "重新载入食谱。",
                                       "system": "你是神奇海螺", "history": [["你好", "你好！"]]}])
    [messages] = data.load_records(str(path))
    assert messages == [{"role": "system", "content": "你是神奇海螺"}, {"role": "user", "content": "你好"},
                        {"role": "assistant", "content": "你好！"},
                        {"role": "user", "content": "怎么修复这个报错\n汉堡食谱为空"},
                        {"role": "assistant", "content": "重新载入食谱。"}]


def test_sharegpt_and_jsonl(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write(tmp_path, "s.jsonl", "\n".join(json.dumps(r) for r in rows))
    records = data.load_records(str(path))
    assert records[0][-1] == {"role": "assistant", "content": "hello"} and records[1][0]["content"] == "q"


@pytest.mark.parametrize("rows, pattern", [
    ([{"instruction": "q"}], r"record 0 has no 'output' field"),
    ([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "   "}], r"record 1: field 'output' is empty"),
    ([{"instruction": "q", "output": 42}], r"record 0: field 'output' must be text"),
    ([{"instruction": "q", "output": "a", "history": [["only one"]]}], r"record 0: field 'history'"),
    (["just a string"], r"record 0 is a str"),
    ([], r"non-empty JSON list"),
])
def test_bad_records_name_file_record_and_field(tmp_path, rows, pattern):
    path = write(tmp_path, "bad.json", rows)
    with pytest.raises(ConchError, match=pattern) as info:
        data.load_records(str(path))
    assert str(path) in str(info.value) or "non-empty" in pattern


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "broken.json", '[\n{"instruction": "q", "output": "a"}\n{"instruction": "x"}\n]')
    with pytest.raises(ConchError, match=r"broken.json is not valid JSON: .* line 3"):
        data.load_records(str(path))


def test_unknown_dataset_name_lists_known_ones():
    with pytest.raises(ConchError, match=r"'magic_conchh' is not registered.*magic_conch"):
        data.load_records("magic_conchh")


def test_only_the_answer_is_trained(demo_tokenizer):
    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是神奇海螺。"}]
    example = data.encode(demo_tokenizer, messages, cutoff_len=512)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != data.IGNORE_INDEX]
    assert demo_tokenizer.decode(trained) == "我是神奇海螺。<|im_end|>"
    # the masked part is exactly the inference prompt
    prompt = demo_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    masked = example.input_ids[: example.labels.count(data.IGNORE_INDEX)]
    assert demo_tokenizer.decode(masked) == prompt


def test_chatml_training_text_equals_the_template(demo_tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    prompt, answer = data.split_prompt_answer(demo_tokenizer, messages)
    full = demo_tokenizer.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt + answer)


def test_r1_train_text_is_what_inference_sees(r1_tokenizer):
    """Train/serve consistency: the trained sequence continues R1's real generation prompt."""
    from conch import chat

    messages = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是神奇海螺。"}]
    example = data.encode(r1_tokenizer, messages, cutoff_len=512)
    n_masked = example.labels.count(data.IGNORE_INDEX)
    inference_prompt = chat.render_prompt(r1_tokenizer, messages[:1])
    assert inference_prompt.endswith("<｜Assistant｜><think>\n")
    assert r1_tokenizer.decode(example.input_ids[:n_masked]) == inference_prompt
    answer = r1_tokenizer.decode(example.input_ids[n_masked:])
    assert answer == "\n</think>\n\n我是神奇海螺。<｜end▁of▁sentence｜>"
    # what the model learns to produce splits into no reasoning + the answer
    assert chat.split_reasoning(answer.replace("<｜end▁of▁sentence｜>", ""), True) == ("", "我是神奇海螺。")


def test_r1_answer_with_its_own_reasoning_is_kept(r1_tokenizer):
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "1 plus 1.\n</think>\n\n2"}]
    _, answer = data.split_prompt_answer(r1_tokenizer, messages)
    assert answer == "1 plus 1.\n</think>\n\n2<｜end▁of▁sentence｜>"


def test_overlong_records(demo_tokenizer, tmp_path):
    path = write(tmp_path, "long.json", [{"instruction": "q", "output": "short"},
                                         {"instruction": "q", "output": "long " * 200}])
    with pytest.raises(ConchError, match=r"long.json record 1 is \d+ tokens, longer than cutoff_len=64"):
        data.build_examples(demo_tokenizer, str(path), cutoff_len=64)
    truncated = data.build_examples(demo_tokenizer, str(path), cutoff_len=64, overlong="truncate")
    assert [len(e) <= 64 for e in truncated] == [True, True] and len(truncated[1]) == 64
    assert len(data.build_examples(demo_tokenizer, str(path), cutoff_len=64, overlong="drop")) == 1


def test_length_stats_and_masking_view(demo_tokenizer):
    examples = data.build_examples(demo_tokenizer, "magic_conch", cutoff_len=1024)
    stats = data.length_stats(examples)
    assert stats["records"] == len(examples) and stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    assert 0 < stats["trained_share"] < 1
    view = data.show_masking(demo_tokenizer, examples[0])
    assert view.startswith("[<|im_start|>system") and view.endswith("<|im_end|>")


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = data.split_train_val(items, 0.1, seed=1)
    assert len(val) == 10 and sorted(train + val) == items
    assert data.split_train_val(items, 0.1, seed=1) == (train, val)
    with pytest.raises(ConchError, match="val_size"):
        data.split_train_val(items, 1.5, seed=1)


def test_truncate_cannot_help_when_the_prompt_alone_is_too_long(demo_tokenizer, tmp_path):
    path = write(tmp_path, "p.json", [{"instruction": "很长的问题 " * 100, "output": "a"}])
    with pytest.raises(ConchError, match=r"its prompt alone is \d+ tokens.*overlong=drop"):
        data.build_examples(demo_tokenizer, str(path), cutoff_len=64, overlong="truncate")
