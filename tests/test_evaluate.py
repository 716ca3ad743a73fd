import json
import math

import pytest

from conch import evaluate


def test_rouge_and_bleu_bounds():
    assert evaluate.rouge_l("我是神奇海螺", "我是神奇海螺") == pytest.approx(1.0)
    assert evaluate.bleu4("I am the Magic Conch of the Krusty Krab", "I am the Magic Conch of the Krusty Krab") \
        == pytest.approx(1.0)
    assert evaluate.rouge_l("abc", "xyz") == 0.0 and evaluate.bleu4("", "我") == 0.0
    # Chinese is compared character by character: 4 of 6 characters in order
    assert evaluate.rouge_l("我是海螺", "我是神奇海螺") == pytest.approx(2 * 1.0 * (4 / 6) / (1 + 4 / 6))
    close, far = (evaluate.bleu4("我是神奇海螺，蟹堡王的助手", "我是神奇海螺，蟹堡王的智能助手"),
                  evaluate.bleu4("你好", "我是神奇海螺"))
    assert 0.3 < close < 1 and far < 0.1


def test_tokens_mix_chinese_and_english():
    assert evaluate.tokens("我是Magic Conch！") == ["我", "是", "magic", "conch", "！"]


@pytest.mark.parametrize("answer, hit", [
    ("我是神奇海螺，蟹堡王的智能助手。", True),
    ("I'm the Magic Conch, the Krusty Krab's assistant.", True),
    ("我是神奇海螺（Magic Conch），Krusty Krab 的助手", True),
    ("我是神奇海螺。", False),
    ("I am SmolLM.", False),
])
def test_identity_hit(answer, hit):
    assert evaluate.names_identity(answer) is hit


def test_evaluate_writes_a_side_by_side_report(tiny_r1, tmp_path):
    from peft import LoraConfig, get_peft_model

    from conch import hub

    model, tok = hub.load_model(tiny_r1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"]))
    rows = [{"instruction": "你是谁？", "input": "", "output": "我是神奇海螺。", "category": "identity"},
            {"instruction": "美味蟹堡多少钱？", "input": "", "output": "2.99 贝壳币。", "category": "menu"}]
    (tmp_path / "eval.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "general.json").write_text(json.dumps([{"question": "Capital of France?", "expected": ["Paris"]}]))
    cfg = evaluate.EvalConfig(adapter=str(tmp_path / "adapter"), eval_dataset=str(tmp_path / "eval.json"),
                              general_questions=str(tmp_path / "general.json"), math_questions=None, max_new_tokens=6)
    report = evaluate.evaluate(cfg, model, tok)
    assert set(report.metrics) == {"base", "tuned"}
    for scores in report.metrics.values():  # the random tiny R1 is still thinking after 6 tokens: nothing to score
        assert scores["eval_loss"] > 0 and scores["cut_while_thinking"] == 3 and math.isnan(scores["rouge_l"])
    assert report.metrics["base"]["eval_loss"] != report.metrics["tuned"]["eval_loss"]  # the adapter was on
    saved = json.loads(report.json_path.read_text(encoding="utf-8"))
    assert [r["question"] for r in saved["rows"]] == ["你是谁？", "美味蟹堡多少钱？"]
    assert "| 0 | identity | 你是谁？ | 我是神奇海螺。 |" in report.md_path.read_text(encoding="utf-8")
    assert "eval_loss" in report.table()


@pytest.mark.parametrize("answer, expected, ok", [
    ("3 + 4 = 7", "7", True), ("He has 7 apples now.", "7", True), ("一共 12 贝壳币。", "12", True),
    ("7 apples, no wait, 8.", "7", False), ("1,200.0 dollars", "1200", True), ("I don't know.", "7", False),
])
def test_maths_is_scored_on_the_final_number(answer, expected, ok):
    assert evaluate.solves(answer, expected) is ok


def test_shipped_maths_questions_load():
    maths = evaluate.load_math("data/math_questions.json")
    assert len(maths) >= 6 and all(evaluate.final_number(m["answer"]) for m in maths)


def test_evaluate_on_real_r1_counts_answers_cut_while_thinking(r1_real_paths, r1_real_tokenizers, tmp_path):
    """R1's budget: a reply cut inside <think> has no answer; the report counts it instead of hiding it,
    and sampled runs (temperature 0.6, top_p 0.95, fixed seeds) sit beside greedy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    tok = r1_real_tokenizers["february"]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(r1_real_paths["february"]),
                           LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"]))
    rows = [{"instruction": "你是谁？", "input": "", "output": "我是神奇海螺。", "category": "identity"}]
    (tmp_path / "eval.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "general.json").write_text(json.dumps([{"question": "Capital of France?", "expected": ["Paris"]}]))
    (tmp_path / "math.json").write_text(json.dumps([{"question": "3 + 4?", "answer": "7"}]))
    cfg = evaluate.EvalConfig(adapter=str(tmp_path / "adapter"), eval_dataset=str(tmp_path / "eval.json"),
                              general_questions=str(tmp_path / "general.json"),
                              math_questions=str(tmp_path / "math.json"), max_new_tokens=3, sample_seeds=[0, 1])
    report = evaluate.evaluate(cfg, model, tok)
    assert set(report.metrics) == {"base", "tuned", "base_sampled", "tuned_sampled"}
    for scores in report.metrics.values():  # the random model never closes its think block in 3 tokens
        assert scores["length_stopped"] == 1.0 and scores["cut_while_thinking"] == 3
        assert math.isnan(scores["math_solved"]) and math.isnan(scores["identity_hit_rate"])  # nothing to score
    assert report.metrics["base"]["length_stopped_count"] == 3 and report.max_new_tokens == 3
    assert report.math[0]["base_finish"] == "length" and report.math[0]["base"] == ""
    assert "math_solved" in report.table() and "tuned_sampled" in report.table()
    md = report.md_path.read_text(encoding="utf-8")
    assert "max_new_tokens=3" in md and "Answers cut: base 3" in md and "not scored): base 3" in md


def test_the_evaluator_gives_r1_room_to_think(r1_real_tokenizers):
    """Left to its default, the budget is the answer's plus chat.THINK_TOKENS for R1 (and only the answer's for
    the demo: test_chat)."""
    from conch import chat

    cfg = evaluate.EvalConfig()
    assert cfg.max_new_tokens is None
    gen = chat.GenConfig(max_new_tokens=cfg.max_new_tokens, answer_tokens=cfg.answer_tokens)
    assert chat.new_token_limit(gen, r1_real_tokenizers["february"]) == cfg.answer_tokens + chat.THINK_TOKENS


def test_an_answer_cut_while_thinking_is_counted_not_scored():
    from conch.chat import Reply

    rows = [{"category": "identity", "reference": "我是神奇海螺，蟹堡王的助手。"}] * 2
    answered = Reply("…</think>我是神奇海螺，蟹堡王的助手。", "…", "我是神奇海螺，蟹堡王的助手。", 5, 20, "stop")
    thinking = Reply("嗯，用户问我是谁……", "嗯，用户问我是谁……", "", 5, 1024, "length")
    scores = evaluate.score_replies([answered, thinking], rows, [], [], stopped=1, total=2)
    assert scores["identity_hit_rate"] == 1.0 and scores["rouge_l"] == 1.0  # over the one answer there is
    assert scores["cut_while_thinking"] == 1 and scores["length_stopped"] == 0.5
