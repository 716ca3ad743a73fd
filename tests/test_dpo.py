"""DPO: preference data, the prompts TRL sees, training on a tiny model, the style before and after."""

import json
import subprocess
import sys

import pytest

from conch import chat, data, dpo, hub, style
from conch.errors import ConchError

PLAYFUL = ["嘿嘿～{} 当然可以 ✨", "好耶～{} 没问题 (≧▽≦)"]
DRY = ["综上所述，{} 根据规定可以。", "首先，{} 其次，因此可以。"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = [{"prompt": f"问题{i}：可以点单吗？", "chosen": PLAYFUL[i % 2].format(i), "rejected": DRY[i % 2].format(i)}
            for i in range(16)]
    (folder / "pairs.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "pairs.json", "ranking": True, "columns": {"prompt": "prompt"}},
        "plain": {"file_name": "pairs.json"}}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, pairs_dir):
    from conch.tiny import build_tiny_r1

    rows = json.loads((pairs_dir / "pairs.json").read_text(encoding="utf-8"))
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in rows]
    return build_tiny_r1(tmp_path_factory.mktemp("tiny_dpo"), texts=texts, init_std=0.2)


def config(model, pairs_dir, out, **kw):
    values = dict(base_model=str(model), dataset="pairs", dataset_dir=str(pairs_dir), output_dir=str(out),
                  learning_rate=5e-3, num_train_epochs=3, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                  warmup=0, lora_target=["q_proj", "v_proj"], plot="lines", logging_steps=2, save_steps=6)
    values.update(kw)
    return dpo.DpoConfig(**values)


def test_load_pairs_reads_the_ranking_format(pairs_dir):
    pairs = data.load_pairs("pairs", pairs_dir)
    assert len(pairs) == 16
    assert pairs[0].messages == [{"role": "user", "content": "问题0：可以点单吗？"}]
    assert pairs[0].chosen.startswith("嘿嘿") and pairs[0].rejected.startswith("综上所述")


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "chosen": "a"}], "has no 'rejected' field"),
    ([{"prompt": "q", "chosen": "same", "rejected": "same "}], "are the same text"),
    ([{"prompt": "", "chosen": "a", "rejected": "b"}], "field 'prompt' is empty"),
    ([{"prompt": "q", "chosen": ["a"], "rejected": "b"}], "must be text"),
    ([], "non-empty JSON list"),
])
def test_bad_pairs_are_one_sentence(tmp_path, rows, message):
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(ConchError, match=message):
        data.load_pairs(str(tmp_path / "bad.json"))


def test_a_dataset_without_ranking_is_refused(pairs_dir):
    with pytest.raises(ConchError, match='needs "ranking": true'):
        data.load_pairs("plain", pairs_dir)


def test_the_shipped_preference_data_is_valid():
    pairs = data.load_pairs("magic_conch_dpo", "data")
    assert len(pairs) >= 80
    assert len({p.messages[-1]["content"] for p in pairs}) == len(pairs)
    chosen = style.style_score([p.chosen for p in pairs])
    rejected = style.style_score([p.rejected for p in pairs])
    assert chosen.playful == 1 and chosen.dry == 0, "every chosen answer carries the playful markers only"
    assert rejected.dry == 1 and rejected.playful == 0, "every rejected answer carries the dry markers only"
    heldout = dpo.load_heldout("data/magic_conch_dpo_heldout.json")
    assert not {h["prompt"] for h in heldout} & {p.messages[-1]["content"] for p in pairs}


def test_prompts_are_rendered_as_inference_sees_them(tiny, pairs_dir):
    tokenizer = hub.load_tokenizer(tiny)
    rows = dpo.preference_dataset(tokenizer, config(tiny, pairs_dir, "unused"))
    pair = data.load_pairs("pairs", pairs_dir)[0]
    inference = chat.render_prompt(tokenizer, pair.messages)
    # TRL tokenizes the prompt text with special tokens on: the result must be the inference prompt's ids
    assert tokenizer(rows[0]["prompt"])["input_ids"] == tokenizer(inference, add_special_tokens=False)["input_ids"]
    # R1: the answer follows an empty think block and ends with the end-of-sentence token
    assert rows[0]["chosen"] == "\n</think>\n\n" + pair.chosen + tokenizer.eos_token
    assert rows[0]["rejected"] == "\n</think>\n\n" + pair.rejected + tokenizer.eos_token


def test_dpo_learns_the_preference_and_keeps_the_reference(tiny, pairs_dir, tmp_path):
    import torch

    result = dpo.dpo(config(tiny, pairs_dir, tmp_path / "run"))
    assert result.metrics["pair_accuracy"] >= 0.9
    assert result.metrics["pair_margin"] > 0.5
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_log.jsonl", "dpo.png", "dpo_config.yaml",
            "dpo_results.json", "checkpoint-6", "checkpoint-12"} <= names
    log = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    accuracies = [h["rewards/accuracies"] for h in log if "rewards/accuracies" in h]
    assert accuracies[0] == 0 and accuracies[-1] == 1
    assert log[0]["rewards/margins"] == pytest.approx(0, abs=1e-6), "at step 1 the policy is the reference"

    # the reference is the starting model: with the adapter disabled the logits are the base model's
    base, tokenizer = hub.load_model(tiny)
    ids = tokenizer("问题3：可以点单吗？", return_tensors="pt")["input_ids"]
    model = result.model
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)

    # and a reloaded adapter gives the trained preference: chosen more likely than rejected, vs the base
    reloaded, tok = chat.load(tiny, tmp_path / "run")

    def margin(m):
        rows = dpo.preference_dataset(tok, config(tiny, pairs_dir, "unused"))
        total = 0.0
        for row in rows.select(range(4)):
            scores = []
            for answer in (row["chosen"], row["rejected"]):
                p = tok(row["prompt"])["input_ids"]
                full = tok(row["prompt"] + answer)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(m(input_ids=torch.tensor([full])).logits[0, :-1], -1)
                scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(p), len(full))))
            total += scores[0] - scores[1]
        return total

    with reloaded.disable_adapter():
        before = margin(reloaded)
    assert margin(reloaded) > before + 1


def test_pure_dpo_starts_at_ln_2_without_precomputed_reference(tiny, pairs_dir, tmp_path):
    result = dpo.dpo(config(tiny, pairs_dir, tmp_path / "pure", sft_weight=0, precompute_ref_log_probs=False,
                            max_steps=4, logging_steps=1))
    assert result.log_history[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0): policy == reference
    assert result.metrics["pair_accuracy"] > 0.5  # the final evaluation computes the reference on the fly


def test_loss_parts_split_the_logged_loss():
    history = [{"current_steps": 2, "loss": 3.0, "rewards/margins": 0.0},
               {"current_steps": 4, "loss": 1.2, "rewards/margins": 14.0},
               {"current_steps": 4, "train_loss": 2.0}]  # the summary line has no margin: skipped
    first, last = dpo.loss_parts(history)
    assert first["dpo_at_least"] == pytest.approx(0.6931, abs=1e-4)  # -log sigmoid(0) = ln 2
    assert first["sft_at_most"] == pytest.approx(3.0 - 0.6931, abs=1e-4)
    assert last["dpo_at_least"] < 1e-5 and last["sft_at_most"] == pytest.approx(1.2, abs=1e-5)
    assert dpo.loss_parts(history, sft_weight=2.0)[0]["sft_at_most"] == pytest.approx((3.0 - 0.6931) / 2, abs=1e-4)


@pytest.mark.parametrize("override, message", [
    (dict(beta=0), "beta must be positive"),
    (dict(plot="gif"), "plot must be"),
    (dict(base_model="outputs/no_such_merged_model"), "run notebook 06"),
    (dict(dataset="plain"), "not a preference dataset"),
    (dict(lora_target=["attn_qkv"]), "not module names"),
])
def test_bad_settings_are_one_sentence(tiny, pairs_dir, tmp_path, override, message):
    with pytest.raises(ConchError, match=message):
        dpo.dpo(config(tiny, pairs_dir, tmp_path / "bad", **override))


def test_shipped_configs_load():
    from conch.config import load_config

    gpu = load_config(dpo.DpoConfig, "configs/magic_conch_dpo.yaml")
    assert gpu.base_model == "outputs/magic_conch_merged" and gpu.beta == 0.1
    cpu = load_config(dpo.DpoConfig, ["configs/magic_conch_dpo.yaml", "configs/magic_conch_dpo_cpu.yaml"])
    assert cpu.dataset == "magic_conch_dpo" and cpu.learning_rate > gpu.learning_rate


def test_cli_says_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "conch", "dpo", "--base_model", str(tmp_path / "none"),
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: base_model") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("revision, boundary_moves", [("january", False), ("february", True)])
def test_trl_prompt_completion_boundary_on_the_real_r1_tokenizer(r1_real_tokenizers, pairs_dir, revision,
                                                                 boundary_moves):
    """TRL tokenizes the prompt alone and prompt + answer, and starts the answer where they diverge.
    With R1's real vocabulary the February prompt's last "\\n" (after <think>) merges with the
    answer's first into one "\\n\\n" token, so the boundary moves one token into the prompt; the
    January prompt ends in a special token, and the boundary is exact."""
    from trl.data_utils import common_prefix_length

    tok = r1_real_tokenizers[revision]
    rows = dpo.preference_dataset(tok, dpo.DpoConfig(dataset="pairs", dataset_dir=str(pairs_dir)))
    pair = data.load_pairs("pairs", pairs_dir)[0]
    prompt_ids = tok(text=rows[0]["prompt"])["input_ids"]  # as TRL does: special tokens on
    inference = tok(chat.render_prompt(tok, pair.messages), add_special_tokens=False)["input_ids"]
    assert prompt_ids == inference and prompt_ids.count(151646) == 1  # one BOS, the inference prompt
    full = tok(text=rows[0]["prompt"] + rows[0]["chosen"])["input_ids"]
    boundary = common_prefix_length(prompt_ids, full)
    assert full[-1] == tok.eos_token_id  # the answer ends in EOS although pad == EOS
    if boundary_moves:
        assert boundary == len(prompt_ids) - 1 and full[boundary] == 271  # "\\n\\n"
        assert tok.decode(full[boundary:]).startswith("\n\n</think>\n\n" + pair.chosen[:4])
    else:
        assert boundary == len(prompt_ids) and tok.decode(full[boundary:]).startswith("<think>\n\n</think>\n\n")


def test_the_lm_head_scores_labelled_positions_only_with_the_same_numbers(tiny):
    """dpo.labelled_positions_only: TRL's fused head gathers the answers' positions on the CPU too (its switch
    is still where conch expects it), and the log-probabilities are the full computation's."""
    import torch
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    assert callable(getattr(trl_utils, "_use_triton", None)), "TRL moved it: update dpo.labelled_positions_only"
    model, _ = hub.load_model(tiny)
    add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100  # padding
    cpu = torch.device("cpu")
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        assert trl_utils._use_triton(cpu) is False
        with dpo.labelled_positions_only():
            assert trl_utils._use_triton(cpu) is True
            gathered = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
        assert trl_utils._use_triton(cpu) is False, "restored on exit"
    assert torch.allclose(full, gathered, atol=1e-5)
    assert (gathered[:, :4] == 0).all() and (gathered[1, 8:] == 0).all() and (gathered[0, 4:] != 0).all()
