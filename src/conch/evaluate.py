"""Stage 5: what did fine-tuning change? Base vs fine-tuned, side by side, with numbers.

``evaluate(EvalConfig)`` loads the base model once with the adapter on top and answers every
held-out question twice (adapter disabled, then enabled), in batches, greedily. It reports:

- eval loss and perplexity of the reference answers (answer tokens only, as in training);
- ROUGE-L and BLEU-4 against the references, on characters for Chinese and words for other
  text (LLaMA-Factory segments Chinese with jieba; characters need no dictionary and rank
  answers the same way on short texts);
- identity hit rate: the share of identity answers that name both the Magic Conch (神奇海螺)
  and the Krusty Krab (蟹堡王);
- a forgetting check: general questions the training data never touches, with expected words,
  and short maths word problems (GSM8K-style) scored on the final number of the answer, so that
  losing R1's reasoning shows;
- how many answers stopped at ``max_new_tokens`` (``finish_reason == "length"``). R1 thinks
  before it answers: the budget follows the model (`conch.chat.budget`: ``answer_tokens`` plus
  1,024 for a reasoning model), and an answer still cut inside ``<think>`` is counted
  (``cut_while_thinking``), not scored as wrong. Every score reads the answer after ``</think>``.

Greedy decoding gives one reproducible answer; R1 is meant to be sampled (temperature 0.6,
top_p 0.95, its generation_config). ``sample_seeds`` adds sampled runs with those settings and
fixed seeds beside the greedy one, averaged over the seeds.

It writes ``report.json`` and ``report.md`` (the side-by-side table) next to the adapter.

*How* answers are written (the style DPO tunes, notebook 10) is scored in `conch.style`.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ConchError

IDENTITY_NAMES = (("神奇海螺", "magic conch"), ("蟹堡王", "krusty krab"))


@dataclass
class EvalConfig:
    base_model: str = "auto"
    adapter: str = "outputs/magic_conch_lora"
    eval_dataset: str = "magic_conch_eval"  # name in dataset_dir/dataset_info.json, or a path
    dataset_dir: str = "data"
    general_questions: str = "data/general_questions.json"
    math_questions: str | None = "data/math_questions.json"  # GSM8K-style, scored on the final number
    max_new_tokens: int | None = None  # None: answer_tokens, plus chat.THINK_TOKENS for a reasoning model (R1)
    answer_tokens: int = 128  # the course's answers are one to three sentences
    sample_seeds: list[int] = field(default_factory=list)  # e.g. [0, 1, 2]: sampled runs beside greedy
    temperature: float = 0.6  # for the sampled runs (R1's recommended settings)
    top_p: float = 0.95
    # questions generated together (left-padded): the whole 56-question set in one batch ran 1.9x faster than
    # batches of 8 on 2 CPU cores, with the same greedy answers (docs/benchmarks.md); on a 24 GB GPU the 1.5B's KV
    # cache for 64 x ~1,300 tokens is ~2.4 GB
    batch_size: int = 64
    cutoff_len: int = 1024
    report_dir: str | None = None  # default: the adapter folder


# ---------------------------------------------------------------------------------------------
# text metrics


_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9\u3400-\u9fff]")


def tokens(text: str) -> list[str]:
    """Chinese characters one by one, other words whole, punctuation as its own token; lowercased."""
    return [t.lower() for t in _TOKEN.findall(text)]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 from the longest common subsequence of tokens."""
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in c:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def bleu4(candidate: str, reference: str) -> float:
    """Sentence BLEU-4 with add-one smoothing of the 2-4-gram precisions and a brevity penalty."""
    c, r = tokens(candidate), tokens(reference)
    if not c or not r:
        return 0.0
    log_precision = 0.0
    for n in range(1, 5):
        grams = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
        ref = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        matched = sum(min(count, ref[g]) for g, count in grams.items())
        total = max(len(c) - n + 1, 0)
        if n == 1:
            if matched == 0:
                return 0.0
            log_precision += math.log(matched / total)
        else:
            log_precision += math.log((matched + 1) / (total + 1))
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(log_precision / 4)


def names_identity(answer: str) -> bool:
    """True when the answer names both the Magic Conch and the Krusty Krab (Chinese or English)."""
    low = answer.lower()
    return all(any(name in low for name in names) for names in IDENTITY_NAMES)


def knows(answer: str, expected: list[str]) -> bool:
    low = answer.lower()
    return any(e.lower() in low for e in expected)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(answer: str) -> str | None:
    """The last number in an answer, normalised ("1,200.0" -> "1200"); None when there is none.
    GSM8K is scored the same way: only the final number counts, not the working before it."""
    found = _NUMBER.findall(answer)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def solves(answer: str, expected: str) -> bool:
    return final_number(answer) == final_number(expected)


# ---------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class Report:
    metrics: dict  # {"base": {...}, "tuned": {...}}
    rows: list[dict]  # question, category, reference, base, tuned
    general: list[dict]  # question, expected, base, tuned, base_ok, tuned_ok
    math: list[dict] = field(default_factory=list)  # question, answer, base, tuned, base_ok, tuned_ok
    json_path: Path | None = None
    md_path: Path | None = None
    max_new_tokens: int | None = None  # the budget the answers had (chat.budget: R1 gets room to think)

    def table(self) -> str:
        """The metric table as text."""
        keys = ["eval_loss", "perplexity", "rouge_l", "bleu4", "identity_hit_rate", "general_kept",
                "math_solved", "length_stopped"]
        columns = [c for c in ("base", "tuned", "base_sampled", "tuned_sampled") if c in self.metrics]
        lines = [f"{'metric':<20}" + "".join(f"{c:>15}" for c in columns)]
        for k in keys:
            values = [self.metrics[c].get(k) for c in columns]
            lines.append(f"{k:<20}" + "".join(f"{'-':>15}" if v is None else f"{v:>15.3f}" for v in values))
        return "\n".join(lines)


def answer_loss(model, tokenizer, examples, batch_size: int = 8) -> float:
    """Mean loss over answer tokens only (the same masking as training), padded batches; the LM head
    runs only where there is an answer token to predict (``conch.loss``)."""
    from .loss import answer_loss_sums
    from .data import collator

    collate = collator(tokenizer, packing=False)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in examples[i:i + batch_size]])
        summed, n = answer_loss_sums(model, {k: v.to(model.device) for k, v in batch.items()})
        total, count = total + summed, count + n
    return total / max(count, 1)


def replies_for(model, tokenizer, questions, gen, batch_size) -> list:
    """`chat.Reply` objects for many questions, in batches."""
    from . import chat

    replies = []
    for i in range(0, len(questions), batch_size):
        replies += chat.generate(model, tokenizer, questions[i:i + batch_size], gen)
    return replies


def answers_for(model, tokenizer, questions, gen, batch_size) -> list[str]:
    """The answers (the text after ``</think>``) for many questions, in batches."""
    return [r.answer for r in replies_for(model, tokenizer, questions, gen, batch_size)]


def score_replies(replies, rows, general_replies, general, loss=None, math_replies=(), maths=(), stopped=0,
            total=1) -> dict:
    """Scores over the replies that have an answer: one cut by the budget while still thinking (a reasoning model
    given too few tokens) is counted in ``cut_while_thinking``, not scored as a wrong answer."""
    def answered(replies, items):
        return [(r.answer, item) for r, item in zip(replies, items) if not r.cut_while_thinking]

    def mean(values):
        return sum(values) / len(values) if values else float("nan")

    pairs = answered(replies, rows)
    general_pairs, math_pairs = answered(general_replies, general), answered(math_replies, maths)
    cut = sum(r.cut_while_thinking for rs in (replies, general_replies, math_replies) for r in rs)
    scores = {
        "rouge_l": mean([rouge_l(a, r["reference"]) for a, r in pairs]),
        "bleu4": mean([bleu4(a, r["reference"]) for a, r in pairs]),
        "identity_hit_rate": mean([names_identity(a) for a, r in pairs if r["category"] == "identity"]),
        "general_kept": mean([knows(a, g["expected"]) for a, g in general_pairs]),
        "math_solved": mean([solves(a, m["answer"]) for a, m in math_pairs]),
        "length_stopped": stopped / max(total, 1),  # share of answers cut at max_new_tokens
        "length_stopped_count": stopped,
        "cut_while_thinking": cut,  # of those, cut before </think>: not scored
    }
    if loss is not None:
        scores = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50)), **scores}
    return scores


def load_math(path: str | Path | None) -> list[dict]:
    """Maths word problems: a JSON list of {"question": ..., "answer": <the final number>}."""
    from .data import field_value, read_json

    if not path:
        return []
    path = Path(path)
    if not path.exists():
        raise ConchError(f"maths question file {path} does not exist; set math_questions to a JSON list of "
                         '{"question": ..., "answer": ...} objects, or to null to skip the maths check.')
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ConchError(f"{path} must hold a JSON list of {{\"question\": ..., \"answer\": ...}} objects.")
    out = []
    for i, row in enumerate(rows):
        question = field_value(row, "question", i, path, required=True)
        answer = field_value(row, "answer", i, path, required=True)
        if final_number(answer) is None:
            raise ConchError(f"{path} record {i}: 'answer' must be the final number, got '{answer}'.")
        out.append({"question": question, "answer": answer})
    return out


def _answer_all(model, tokenizer, question_sets, gen, batch_size):
    """Replies for several lists of questions in one go; returns (answers per list, stopped, total)."""
    flat = [q for qs in question_sets for q in qs]
    replies = replies_for(model, tokenizer, flat, gen, batch_size)
    out, start = [], 0
    for qs in question_sets:
        out.append(replies[start:start + len(qs)])
        start += len(qs)
    stopped = sum(r.finish_reason == "length" for r in replies)
    return out, stopped, len(replies)


def evaluate(cfg: EvalConfig, model=None, tokenizer=None) -> Report:
    """Compare base and fine-tuned answers on the held-out set; write report.json and report.md.

    Pass ``model`` (a PeftModel) and ``tokenizer`` to reuse ones already loaded.
    """
    from . import chat, data

    if model is None:
        model, tokenizer = chat.load(cfg.base_model, cfg.adapter)
    if not hasattr(model, "disable_adapter"):
        raise ConchError("evaluate needs the base model with its LoRA adapter on top; pass adapter=<folder>.")
    file, _ = data.find_dataset(cfg.eval_dataset, cfg.dataset_dir)
    records = data.load_records(cfg.eval_dataset, cfg.dataset_dir)
    raw = data.read_json(file)
    rows = [{"question": m[-2]["content"], "category": (r.get("category") if isinstance(r, dict) else None) or "",
             "reference": m[-1]["content"]} for m, r in zip(records, raw)]
    questions = [m[:-1] for m in records]
    examples = [data.encode(tokenizer, m, cfg.cutoff_len, "truncate", f"{file} record {i}")
                for i, m in enumerate(records)]
    general = json.loads(Path(cfg.general_questions).read_text(encoding="utf-8")) if cfg.general_questions else []
    maths = load_math(cfg.math_questions)
    question_sets = [questions, [g["question"] for g in general], [m["question"] for m in maths]]
    greedy = chat.GenConfig(max_new_tokens=cfg.max_new_tokens, answer_tokens=cfg.answer_tokens, temperature=0)
    sampled = [replace(greedy, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed) for seed in cfg.sample_seeds]

    def run(with_loss: bool):
        (replies, general_replies, math_replies), stopped, total = _answer_all(
            model, tokenizer, question_sets, greedy, cfg.batch_size)
        loss = answer_loss(model, tokenizer, examples, cfg.batch_size) if with_loss else None
        answers = [[r.answer for r in rs] for rs in (replies, general_replies, math_replies)]
        scores = score_replies(replies, rows, general_replies, general, loss, math_replies, maths, stopped, total)
        finish = [[r.finish_reason for r in rs] for rs in (replies, general_replies, math_replies)]
        runs = []
        for gen in sampled:  # R1's own sampling, fixed seeds: the scores averaged over the seeds
            (s_replies, s_general, s_math), s_stopped, s_total = _answer_all(
                model, tokenizer, question_sets, gen, cfg.batch_size)
            runs.append(score_replies(s_replies, rows, s_general, general, None, s_math, maths, s_stopped, s_total))
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]} if runs else None
        return answers, finish, scores, mean

    results = {}
    with model.disable_adapter():
        results["base"] = run(True)
    results["tuned"] = run(True)

    for i, row in enumerate(rows):
        for name in ("base", "tuned"):
            row[name], row[f"{name}_finish"] = results[name][0][0][i], results[name][1][0][i]
    general_rows = [{"question": g["question"], "expected": g["expected"], "base": results["base"][0][1][i],
                     "tuned": results["tuned"][0][1][i], "base_ok": knows(results["base"][0][1][i], g["expected"]),
                     "tuned_ok": knows(results["tuned"][0][1][i], g["expected"])} for i, g in enumerate(general)]
    math_rows = [{"question": m["question"], "answer": m["answer"], "base": results["base"][0][2][i],
                  "tuned": results["tuned"][0][2][i], "base_finish": results["base"][1][2][i],
                  "tuned_finish": results["tuned"][1][2][i], "base_ok": solves(results["base"][0][2][i], m["answer"]),
                  "tuned_ok": solves(results["tuned"][0][2][i], m["answer"])} for i, m in enumerate(maths)]
    metrics = {name: results[name][2] for name in ("base", "tuned")}
    for name in ("base", "tuned"):
        if results[name][3] is not None:
            metrics[f"{name}_sampled"] = results[name][3]
    report = Report(metrics, rows, general_rows, math_rows, max_new_tokens=chat.new_token_limit(greedy, tokenizer))
    out = Path(cfg.report_dir or cfg.adapter)
    out.mkdir(parents=True, exist_ok=True)
    report.json_path, report.md_path = out / "report.json", out / "report.md"
    payload = {"config": asdict(cfg), "max_new_tokens": report.max_new_tokens, "metrics": report.metrics,
               "rows": rows, "general": general_rows,
               "math": math_rows}
    report.json_path.write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
    report.md_path.write_text(to_markdown(report), encoding="utf-8")
    return report


def _cell(text: str, width: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def to_markdown(report: Report) -> str:
    lines = ["# Base vs fine-tuned", "", "```", report.table(), "```", "",
             "| # | category | question | reference | base | tuned |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(report.rows):
        lines.append(f"| {i} | {r['category']} | {_cell(r['question'])} | {_cell(r['reference'])} | "
                     f"{_cell(r['base'])} | {_cell(r['tuned'])} |")
    lines += ["", "## Forgetting check", "", "| question | expected | base | tuned |", "|---|---|---|---|"]
    for g in report.general:
        mark = lambda ok: "✅" if ok else "❌"  # noqa: E731
        lines.append(f"| {_cell(g['question'])} | {', '.join(g['expected'])} | {mark(g['base_ok'])} "
                     f"{_cell(g['base'], 60)} | {mark(g['tuned_ok'])} {_cell(g['tuned'], 60)} |")
    if report.math:
        lines += ["", "## Maths (final number)", "", "| question | answer | base | tuned |", "|---|---|---|---|"]
        for m in report.math:
            mark = lambda ok, finish: ("✅" if ok else "❌") + (" ✂️" if finish == "length" else "")  # noqa: E731
            lines.append(f"| {_cell(m['question'])} | {m['answer']} | {mark(m['base_ok'], m['base_finish'])} "
                         f"{_cell(m['base'], 60)} | {mark(m['tuned_ok'], m['tuned_finish'])} {_cell(m['tuned'], 60)} |")
    lines += ["", f"✂️ = stopped at max_new_tokens={report.max_new_tokens} (finish_reason=length). Answers cut: "
              + ", ".join(f"{c} {report.metrics[c]['length_stopped_count']}" for c in report.metrics
                          if "length_stopped_count" in report.metrics[c])
              + "; of those, cut while still thinking (not scored): "
              + ", ".join(f"{c} {report.metrics[c]['cut_while_thinking']}" for c in report.metrics
                          if "cut_while_thinking" in report.metrics[c]) + "."]
    return "\n".join(lines) + "\n"
