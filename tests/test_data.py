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
    path = write(tmp_path, "a.json", [{"instruction": "怎么修复这个报错",
                                       "input": "汉堡食谱为空", "output": "重新载入食谱。",
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
    ([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "   "}],
     r"record 1: field 'output' is empty"),
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


def test_r1_reasoning_is_kept_or_dropped_on_purpose(r1_tokenizer):
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\n1 plus 1.\n</think>\n\n2"}]
    _, kept = data.split_prompt_answer(r1_tokenizer, messages, reasoning="keep")
    assert kept == "1 plus 1.\n</think>\n\n2<｜end▁of▁sentence｜>"
    _, dropped = data.split_prompt_answer(r1_tokenizer, messages)  # drop is the default
    assert dropped == "\n</think>\n\n2<｜end▁of▁sentence｜>"
    with pytest.raises(ConchError, match="reasoning must be drop or keep"):
        data.split_prompt_answer(r1_tokenizer, messages, reasoning="some")


def test_reasoning_on_a_template_without_think_blocks(demo_tokenizer):
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\n1 plus 1.\n</think>\n\n2"}]
    assert data.split_prompt_answer(demo_tokenizer, messages, "keep")[1] == (
        "<think>\n1 plus 1.\n</think>\n\n2<|im_end|>")
    assert data.split_prompt_answer(demo_tokenizer, messages, "drop")[1] == "2<|im_end|>"
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert data.split_prompt_answer(demo_tokenizer, plain, "keep")[1] == "a<|im_end|>"


def test_the_shipped_data_carries_a_share_of_reasoning():
    records = data.load_records("magic_conch")
    thinking = [m for m in records if data.has_reasoning(m)]
    assert 8 <= len(thinking) <= 0.1 * len(records)
    for m in thinking:  # LLaMA-Factory's format: the think block first, then an answer that stands alone
        reasoning, answer = data.split_think(m[-1]["content"])
        assert m[-1]["content"].startswith("<think>\n") and reasoning and answer and "<think>" not in answer


# ---------------------------------------------------------------------------------------------
# DeepSeek-R1-Distill's real tokenizer (tests/r1_tokenizer.py), both chat template revisions

BOS_ID, EOS_ID = 151646, 151643
QA = [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是神奇海螺。"}]


@pytest.mark.parametrize("revision", ["january", "february"])
def test_real_r1_one_bos_and_the_prompt_ids_inference_feeds(r1_real_tokenizers, revision):
    from conch import chat

    tok = r1_real_tokenizers[revision]
    example = data.encode(tok, QA, cutoff_len=512)
    assert example.input_ids[0] == BOS_ID and example.input_ids.count(BOS_ID) == 1  # add_bos_token is true
    n_masked = example.labels.count(data.IGNORE_INDEX)
    # the ids inference feeds: chat.generate's encoding, and transformers' own tokenize=True
    prompt = chat.render_prompt(tok, QA[:1])
    fed = tok([prompt], add_special_tokens=False, padding=True)["input_ids"][0]
    assert example.input_ids[:n_masked] == fed
    assert example.input_ids[:n_masked] == tok.apply_chat_template(QA[:1], add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)["input_ids"]


@pytest.mark.parametrize("revision, prompt_end, trained", [
    ("january", "<｜Assistant｜>", "<think>\n\n</think>\n\n我是神奇海螺。<｜end▁of▁sentence｜>"),
    ("february", "<｜Assistant｜><think>\n", "\n</think>\n\n我是神奇海螺。<｜end▁of▁sentence｜>"),
])
def test_real_r1_both_template_revisions_give_a_consistent_train_serve_pair(r1_real_tokenizers, revision,
                                                                            prompt_end, trained):
    from conch import chat

    tok = r1_real_tokenizers[revision]
    example = data.encode(tok, QA, cutoff_len=512)
    n_masked = example.labels.count(data.IGNORE_INDEX)
    prompt = tok.decode(example.input_ids[:n_masked])
    assert prompt.endswith(prompt_end) and prompt == chat.render_prompt(tok, QA[:1])
    answer = tok.decode(example.input_ids[n_masked:])
    assert answer == trained
    # what the model learns to write splits into no reasoning + the answer, under either revision
    generated = tok.decode(example.input_ids[n_masked:], skip_special_tokens=True)
    assert chat.split_reasoning(generated, chat.prompt_opens_think(prompt)) == ("", "我是神奇海螺。")


@pytest.mark.parametrize("revision, trained", [
    ("january", "<think>\n1 加 1。\n</think>\n\n2<｜end▁of▁sentence｜>"),
    ("february", "1 加 1。\n</think>\n\n2<｜end▁of▁sentence｜>"),
])
def test_real_r1_keeps_reasoning_on_purpose(r1_real_tokenizers, revision, trained):
    tok = r1_real_tokenizers[revision]
    messages = [{"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "<think>\n1 加 1。\n</think>\n\n2"}]
    example = data.encode(tok, messages, cutoff_len=512, reasoning="keep")
    n_masked = example.labels.count(data.IGNORE_INDEX)
    assert tok.decode(example.input_ids[n_masked:]) == trained
    assert 151649 in example.labels  # </think>: one added token, trained


def test_real_r1_eos_is_trained_at_the_end_of_every_answer_although_pad_is_eos(r1_real_tokenizers):
    tok = r1_real_tokenizers["february"]
    assert tok.pad_token_id == tok.eos_token_id == EOS_ID
    examples = data.build_examples(tok, "magic_conch", cutoff_len=1024, reasoning="keep")
    assert all(e.input_ids[-1] == EOS_ID and e.labels[-1] == EOS_ID for e in examples)
    assert all(e.input_ids.count(BOS_ID) == 1 for e in examples)
    # padded batches: the padding (also id 151643) is masked, every answer's own EOS is not
    short, long = sorted(examples[:2], key=len)
    batch = data.collator(tok, packing=False)([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    row = batch["labels"][[short, long].index(short)].tolist()
    assert row[len(short) - 1] == EOS_ID and set(row[len(short):]) <= {data.IGNORE_INDEX}
    packed = data.collator(tok, packing=True)([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    assert packed["labels"].tolist()[0].count(EOS_ID) == 2


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


def test_jsonl_syntax_error_names_its_real_line(tmp_path):
    path = write(tmp_path, "broken.jsonl", '{"instruction": "q", "output": "a"}\n\n'
                                           '{"instruction": "q", "output": "a"}\n'
                                           '{"instruction": "x" "output": "b"}\n')
    with pytest.raises(ConchError, match=r"broken.jsonl is not valid JSON: .* at line 4, column 21"):
        data.load_records(str(path))


def test_audit_finds_what_trains_without_an_error(tmp_path):
    rows = [{"instruction": "你们几点开门？", "output": "早上 9 点。"},
            {"instruction": "你们几点开门？ ", "output": "早上 9 点。"},     # duplicate (whitespace differs)
            {"instruction": "你们几点开门?", "output": "早上 9 点。"},      # another question (ASCII '?')
            {"instruction": "你是谁？", "output": "我是神奇海螺。"},
            {"instruction": "你是谁？", "output": "我是海绵宝宝。"},          # conflict
            {"instruction": "美味蟹堡多少钱？", "output": "嗯"}]            # short
    records = data.load_records(str(write(tmp_path, "bad.json", rows)))
    held_out = data.load_records(str(write(tmp_path, "test.json", [{"instruction": "你是谁？", "output": "x"},
                                                                   {"instruction": "新问题", "output": "y"}])))
    found = data.audit(records, held_out)
    assert found.duplicates == [(0, 1)] and found.conflicts == [(3, 4)]
    assert found.short_answers == [5] and found.leaks == [(0, 3)] and not found.ok
    assert "conflicts: [(3, 4)]" in str(found)


def test_the_shipped_data_is_clean():
    found = data.audit(data.load_records("magic_conch"), data.load_records("magic_conch_eval"))
    assert found.ok, found
    assert str(found).startswith("clean")


def test_encodings_utf8_with_bom_reads_gbk_ends_in_one_sentence(tmp_path):
    rows = [{"instruction": "你是谁？", "output": "我是神奇海螺。"}]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    assert data.load_records(str(bom))[0][-1]["content"] == "我是神奇海螺。"
    gbk = tmp_path / "gbk.json"
    gbk.write_bytes(json.dumps(rows, ensure_ascii=False).encode("gbk"))
    with pytest.raises(ConchError, match=r"gbk.json is not UTF-8 text .* save it as UTF-8"):
        data.load_records(str(gbk))
