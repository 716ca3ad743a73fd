import json

import pytest

from conch import evaluate


def test_rouge_and_bleu_bounds():
    assert evaluate.rouge_l("我是神奇海螺", "我是神奇海螺") == pytest.approx(1.0)
    assert evaluate.bleu4("I am the Magic Conch of the Krusty Krab", "I am the Magic Conch of the Krusty Krab") \
        == pytest.approx(1.0)
    assert evaluate.rouge_l("abc", "xyz") == 0.0 and evaluate.bleu4("", "我") == 0.0
    # Chinese is compared character by character: 4 of 6 characters in order
    assert evaluate.rouge_l("我是海螺", "我是神奇海螺") == pytest.approx(2 * 1.0 * (4 / 6) / (1 + 4 / 6))
    close, far = evaluate.bleu4("我是神奇海螺，蟹堡王的助手", "我是神奇海螺，蟹堡王的智能助手"), evaluate.bleu4("你好", "我是神奇海螺")
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
                              general_questions=str(tmp_path / "general.json"), max_new_tokens=6)
    report = evaluate.evaluate(cfg, model, tok)
    assert set(report.metrics) == {"base", "tuned"}
    for scores in report.metrics.values():
        assert scores["eval_loss"] > 0 and 0 <= scores["rouge_l"] <= 1 and scores["identity_hit_rate"] == 0
    assert report.metrics["base"]["eval_loss"] != report.metrics["tuned"]["eval_loss"]  # the adapter was on
    saved = json.loads(report.json_path.read_text(encoding="utf-8"))
    assert [r["question"] for r in saved["rows"]] == ["你是谁？", "美味蟹堡多少钱？"]
    assert "| 0 | identity | 你是谁？ | 我是神奇海螺。 |" in report.md_path.read_text(encoding="utf-8")
    assert "eval_loss" in report.table()
