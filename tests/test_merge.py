import json

import pytest
import torch

from conch import chat, hub, merge
from conch.errors import ConchError


@pytest.fixture(scope="module")
def adapter(tiny_r1, tmp_path_factory):
    """A LoRA adapter with non-zero B (as after training), saved like train() saves it."""
    from peft import LoraConfig, get_peft_model

    model, tok = hub.load_model(tiny_r1)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj"]))
    folder = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cfg(tiny_r1, adapter, out, **kw):
    return merge.MergeConfig(base_model=str(tiny_r1), adapter=str(adapter), output_dir=str(out), **kw)


def test_merge_matches_base_plus_adapter(tiny_r1, adapter, tmp_path):
    result = merge.merge(cfg(tiny_r1, adapter, tmp_path / "merged"))
    assert result.dtype == "fp32" and result.relative_diff <= 1e-4 and result.max_logit_diff < 1e-3
    out = result.output_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert name in result.files, name
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").exists()
    assert not (tmp_path / "merged.tmp").exists()
    assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6
    # the same greedy answers after reload as with base + adapter
    gen = chat.GenConfig(max_new_tokens=8, temperature=0)
    peft_model, tok = chat.load(tiny_r1, adapter)
    merged_model, merged_tok = chat.load(out)
    questions = ["你是谁？", "Who are you?"]
    assert [r.text for r in chat.generate(peft_model, tok, questions, gen)] == \
           [r.text for r in chat.generate(merged_model, merged_tok, questions, gen)]


def test_merge_is_verified_in_fp32_and_a_bf16_copy_reports_its_drift(tiny_r1, adapter, tmp_path):
    result = merge.merge(cfg(tiny_r1, adapter, tmp_path / "bf16", dtype="bf16"))
    # the merge itself was checked in fp32, at the fp32 tolerance
    assert result.tolerance == merge.TOLERANCE["fp32"] and result.relative_diff <= 1e-4
    # the saved copy is bf16 (weights and config), and its drift is measured, not zero
    assert result.dtype == "bf16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert 0 < result.saved_drift <= merge.TOLERANCE["bf16"] and 0.5 < result.saved_top1 <= 1
    fp32 = merge.merge(cfg(tiny_r1, adapter, tmp_path / "fp32", dtype="fp32"))
    assert fp32.saved_drift <= 1e-4 and fp32.saved_top1 == 1 and fp32.size_bytes > 1.5 * result.size_bytes


def test_compare_counts_identical_greedy_tokens(tiny_r1, adapter, tmp_path):
    result = merge.merge(cfg(tiny_r1, adapter, tmp_path / "merged"))
    peft_model, tok = chat.load(tiny_r1, adapter)
    merged_model, _ = chat.load(result.output_dir)
    perturbed, _ = chat.load(result.output_dir)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    questions = ["你是谁？", "Who are you?", "Hi"]
    got = merge.compare(peft_model, {"merged": merged_model, "perturbed": perturbed}, tok, questions, max_new_tokens=8)
    same, other = got["merged"], got["perturbed"]
    assert same.identical == 3 and same.tokens_same == 1 and same.top1 == 1 and same.drift <= 1e-4
    assert [r[0] for r in same.rows] == questions and same.rows[0][1] == same.rows[0][2]
    assert other.drift > 1e-2 and other.top1 < 1 and other.tokens_same < 1
    assert "identical 3/3" in str(same)


def test_sharded_export(tiny_r1, adapter, tmp_path):
    result = merge.merge(cfg(tiny_r1, adapter, tmp_path / "sharded", max_shard_size="200KB"))
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in result.files


def test_failed_export_leaves_nothing_half(tiny_r1, adapter, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier, complete export")
    monkeypatch.setitem(merge.TOLERANCE, "fp32", -1.0)  # every difference is now too large
    with pytest.raises(ConchError, match="nothing was written"):
        merge.merge(cfg(tiny_r1, adapter, out))
    assert (out / "previous.txt").exists() and not (tmp_path / "merged.tmp").exists()


def test_crash_while_saving_leaves_nothing_half(tiny_r1, adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        merge.merge(cfg(tiny_r1, adapter, tmp_path / "merged"))
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


def test_refuses_a_quantized_base(tiny_r1, adapter, tmp_path, monkeypatch):
    real = hub.load_model

    def quantized(*a, **kw):
        model, tok = real(*a, **kw)
        model.config.quantization_config = {"load_in_4bit": True}
        return model, tok

    monkeypatch.setattr(hub, "load_model", quantized)
    with pytest.raises(ConchError, match="is quantized"):
        merge.merge(cfg(tiny_r1, adapter, tmp_path / "merged"))


def test_not_an_adapter(tiny_r1, tmp_path):
    with pytest.raises(ConchError, match="not a LoRA adapter folder"):
        merge.merge(cfg(tiny_r1, tmp_path, tmp_path / "merged"))


def test_merge_on_the_real_r1_tokenizer_keeps_what_serving_needs(r1_real_paths, tmp_path):
    """The merged folder must carry R1's real tokenizer unchanged: one BOS, pad == EOS, its template."""
    from peft import LoraConfig, get_peft_model

    base = r1_real_paths["february"]
    model, tok = hub.load_model(base)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                  target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    result = merge.merge(merge.MergeConfig(base_model=str(base), adapter=str(tmp_path / "adapter"),
                                           output_dir=str(tmp_path / "merged")))
    merged, merged_tok = hub.load_model(result.output_dir)
    messages = chat.to_messages("你是谁？")
    assert chat.render_prompt(merged_tok, messages) == chat.render_prompt(tok, messages)
    assert merged_tok("你是谁")["input_ids"] == [151646, 105043, 100165]
    assert merged_tok.pad_token_id == merged_tok.eos_token_id == 151643
    assert merged.generation_config.bos_token_id == 151646 and merged.config.vocab_size == 151936
    ids = tok(chat.render_prompt(tok, messages), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
