"""DeepSeek-R1-Distill-Qwen-1.5B's architecture with random weights, built without a download.

The benches need the target model's *shape* (what costs time and memory), not its knowledge:

- `arch_config()`: a Qwen2Config with the real model's numbers (hidden 1536, intermediate 8960,
  28 layers, 12 heads / 2 KV heads, vocab 151,936, untied lm_head, rope_theta 10000);
- `build_model()`: random weights in bf16, created directly on the device (seconds on a GPU);
- `build_tokenizer()`: a byte-level BPE that can decode every id below 151,936: the 256
  byte symbols, R1's special tokens, and synthetic words filling the rest of the vocabulary
  (plain vocabulary entries, not 150k "added tokens", which would make loading slow), with
  R1's chat template from `conch.tiny`;
- `save_folder()`: both saved as a normal model folder that `python -m conch serve` and the
  seeds' server load.

The special tokens' rows of the lm_head are zeroed, so greedy decoding never picks the end
token: every request runs to its max_tokens, on both servers, and they do the same work.
"""

from __future__ import annotations

from pathlib import Path

NAME = "deepseek-r1-1.5b-arch"
VOCAB = 151_936


def arch_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                       attention_dropout=0.0, use_cache=True)


def build_tokenizer():
    """Byte-level BPE over the whole 151,936-id vocabulary, with R1's specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conch.tiny import ASSISTANT, BOS, EOS, PAD, R1_CHAT_TEMPLATE, USER

    specials = [BOS, EOS, PAD, USER, ASSISTANT, "<think>", "</think>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 symbols, one per byte
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    n = 0
    while len(vocab) < VOCAB - len(specials):  # "Ġ" + letters: decodes to " word"
        word, k = "", n
        while True:
            word, k = letters[k % 26] + word, k // 26
            if k == 0:
                break
        vocab.setdefault("Ġ" + word, len(vocab))
        n += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=R1_CHAT_TEMPLATE)
    fast.add_tokens(specials[3:])  # R1 keeps these as added, non-special tokens
    assert len(fast) == VOCAB, len(fast)
    return fast


def build_model(device: str = "cpu", dtype=None, seed: int = 0, special_ids: list[int] = ()):
    """Random weights (normal, std 0.02) made directly on `device` in `dtype` (bf16 on GPU)."""
    import torch
    from transformers import Qwen2ForCausalLM

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(arch_config(), dtype=dtype)
    with torch.no_grad():
        for i in special_ids:  # logit 0 for the end token while 151k others are random: never the argmax
            model.lm_head.weight[i].zero_()
    return model


def save_folder(folder: str | Path, device: str = "cpu") -> Path:
    """A servable folder (config, bf16 safetensors, tokenizer, greedy generation_config); reused if present."""
    from transformers import GenerationConfig

    folder = Path(folder)
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    import torch

    tokenizer = build_tokenizer()
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    model = build_model(device, torch.bfloat16, special_ids=ids)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = ids
    model.generation_config = GenerationConfig(bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2],
                                               do_sample=False)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def flops_per_token(model) -> float:
    """LoRA training with a frozen base: ~4 x (non-embedding + lm_head) parameters per token
    (2 forward + 2 for the activation gradients; no weight gradients for frozen weights;
    attention's sequence-length term left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = base.get_input_embeddings().weight
    lm_head = base.get_output_embeddings().weight
    frozen = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n and p is not embed)
    if lm_head is embed:  # tied: the lm_head matmul still costs its FLOPs
        frozen += lm_head.numel()
    return 4.0 * frozen
