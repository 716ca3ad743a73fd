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
