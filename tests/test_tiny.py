"""The tiny fixture must carry DeepSeek-R1's template faithfully, or the R1 tests prove nothing."""

from conch import hub
from conch.tiny import ASSISTANT, BOS, EOS, USER


def test_r1_template(tiny_r1):
    _, tok = hub.load_model(tiny_r1)
    messages = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "你是谁"},
                {"role": "assistant", "content": "<think>hmm</think>我是神奇海螺"},
                {"role": "user", "content": "再说一次"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == f"{BOS}SYS{USER}你是谁{ASSISTANT}我是神奇海螺{EOS}{USER}再说一次{ASSISTANT}<think>\n"


def test_special_tokens_are_single_tokens_and_think_stays_visible(tiny_r1):
    _, tok = hub.load_model(tiny_r1)
    for special in (BOS, EOS, USER, ASSISTANT, "<think>", "</think>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    ids = tok("<think>\nx</think>ok", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nx</think>ok"


# ---------------------------------------------------------------------------------------------
# the real-R1 fixture (tests/r1_tokenizer.py) must be the hub's tokenizer, or its tests prove nothing


def test_real_r1_tokenizer_is_qwen2s_vocabulary_with_r1s_tokens(r1_real_tokenizers):
    for revision, tok in r1_real_tokenizers.items():
        assert tok("hello", add_special_tokens=False)["input_ids"] == [14990], revision
        assert tok("你是谁", add_special_tokens=False)["input_ids"] == [105043, 100165]
        assert tok("\n\n", add_special_tokens=False)["input_ids"] == [271]  # one token, as on the hub
        assert tok("hi")["input_ids"] == [151646, 6023]  # add_bos_token: true
        ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, USER, ASSISTANT, "<think>", "</think>")}
        assert ids == {BOS: 151646, EOS: 151643, USER: 151644, ASSISTANT: 151645, "<think>": 151648, "</think>": 151649}
        assert tok.pad_token == EOS and tok.model_max_length == 16384 and len(tok) == 151665
        # <think> is an added token that is *not* special: decoding keeps it
        assert tok.decode(tok("<think>\nx</think>ok")["input_ids"], skip_special_tokens=True) == "<think>\nx</think>ok"


def test_real_r1_fixture_has_the_hub_shapes(r1_real_paths):
    import json

    for revision, folder in r1_real_paths.items():
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert tok_cfg["tokenizer_class"] == "LlamaTokenizerFast" and tok_cfg["add_bos_token"] is True
        assert tok_cfg["pad_token"] == EOS and tok_cfg["model_max_length"] == 16384
        config = json.loads((folder / "config.json").read_text())
        assert config["vocab_size"] == 151936 and config["bos_token_id"] == config["eos_token_id"] == 151643
        assert config["tie_word_embeddings"] is False
        generation = json.loads((folder / "generation_config.json").read_text())
        assert (generation["bos_token_id"], generation["eos_token_id"]) == (151646, 151643)
        assert (generation["temperature"], generation["top_p"]) == (0.6, 0.95)
    january = (r1_real_paths["january"] / "chat_template.jinja").read_text(encoding="utf-8")
    february = (r1_real_paths["february"] / "chat_template.jinja").read_text(encoding="utf-8")
    assert january.endswith("{{'<｜Assistant｜>'}}{% endif %}")
    assert february.endswith("{{'<｜Assistant｜><think>\\n'}}{% endif %}")
