"""A tiny random DeepSeek-R1-style model, built locally in seconds, for tests and smoke benches.

It has the real model's architecture family (Qwen2, untied lm_head) and the real chat template
(``<｜begin▁of▁sentence｜>``, ``<｜User｜>``, ``<｜Assistant｜>``, a generation prompt that
opens ``<think>\\n``), with a byte-level BPE tokenizer trained on the text you give it. So the
R1 code paths (template, think split, masking) run without any download.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# DeepSeek-R1-Distill-Qwen's template (February 2025 revision) without the tool-call branches:
# the system prompt right after BOS, earlier answers cut to the text after </think>, and a
# generation prompt that opens the think block.
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

_SAMPLE = [
    "我是神奇海螺，蟹堡王的智能助手。", "I am the Magic Conch, the assistant of the Krusty Krab.",
    "What is the capital of France? Paris.", "美味蟹堡的做法：先烤肉饼，再放生菜和番茄。",
    "汉堡食谱为空：请在控制面板重新载入食谱。", "Hello! How can I help you today?",
]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 600):
    """A byte-level BPE trained on `texts`, with R1's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((texts or []) + _SAMPLE * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=R1_CHAT_TEMPLATE)
    # R1 keeps these as added tokens that are *not* special, so decoding keeps <think> visible
    fast.add_tokens([USER, ASSISTANT, "<think>", "</think>"])
    return fast


def build_tiny_r1(folder: str | Path, texts: list[str] | None = None, hidden: int = 128, layers: int = 2,
                  seed: int = 0, init_std: float = 0.02) -> Path:
    """Save a random tiny Qwen2 + tokenizer to `folder` and return it."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    tokenizer = build_tokenizer(texts)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # R1's shipped sampling defaults
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
