"""RAG: chunking, the BM25 index and its rebuild on edits, the prompt, bad folders, and RAG mode in the server."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conch import rag
from conch.errors import ConchError

from .server import running_server

REPO = Path(__file__).resolve().parents[1]

PROMOTIONS = """# 本周优惠

有效期：2025-06-02 至 2025-06-08。

## 本周特价：「海藻圈买二送一」

这周的特价是「海藻圈买二送一」，3.00 贝壳币三份海藻圈。

## 周二买一送一

周二美味蟹堡买一送一。
"""

MANUAL = """# 汉堡机手册

## 报错 E-03：烤板温度过低

打开燃气阀，预热 10 分钟到 180°C。

## 报错 E-07：传送带卡住

按紧急停止，清理传送带，按复位键。

```
# not a heading: inside a code block
```
"""


@pytest.fixture
def kb_dir(tmp_path):
    folder = tmp_path / "knowledge"
    folder.mkdir()
    (folder / "promotions.md").write_text(PROMOTIONS, encoding="utf-8")
    (folder / "manual.md").write_text(MANUAL, encoding="utf-8")
    (folder / "hours.txt").write_text("营业时间\n\n每天 9:00 开门，21:00 关门。\nOpen 9 AM to 9 PM.\n",
                                      encoding="utf-8")
    (folder / "notes.pdf").write_bytes(b"%PDF not indexed")
    return folder


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and "Traceback" not in message


# -- tokens and chunks ---------------------------------------------------------------------------


def test_tokens_chinese_words_english_and_error_codes():
    tokens = rag.tokenize("汉堡机报错 E-03 怎么办？What's this week's special?")
    assert "e-03" in tokens and "报错" in tokens and "汉堡" in tokens
    assert "怎么办" not in tokens and "what" not in tokens  # question words carry nothing
    assert "week" in tokens and "special" in tokens
    assert rag.tokenize("e03")[0] == rag.tokenize("E 03")[0] == "e-03"
    assert rag.tokenize("？！。") == []


def test_markdown_sections_become_passages(kb_dir):
    passages = rag.chunk_file(kb_dir / "manual.md", kb_dir)
    assert [p.heading for p in passages] == ["报错 E-03：烤板温度过低", "报错 E-07：传送带卡住"]
    assert [p.chunk_id for p in passages] == ["manual.md#0", "manual.md#1"]
    assert passages[1].text.startswith("按紧急停止") and "# not a heading" in passages[1].text
    assert all(p.title == "汉堡机手册" for p in passages)
    txt = rag.chunk_file(kb_dir / "hours.txt", kb_dir)
    assert len(txt) == 1 and txt[0].heading == "营业时间" and "21:00" in txt[0].text


def test_a_long_section_is_split_at_paragraphs(tmp_path):
    paragraphs = [f"第{i}段：" + "蟹堡" * 40 + "。" for i in range(5)]
    (tmp_path / "long.md").write_text("## 长\n\n" + "\n\n".join(paragraphs), encoding="utf-8")
    passages = rag.chunk_file(tmp_path / "long.md", tmp_path, chunk_chars=100)
    assert len(passages) == 5 and all(len(p.text) <= 100 for p in passages)
    assert all(p.heading == "长" for p in passages)


# -- the index -------------------------------------------------------------------------------------


def test_search_finds_the_right_passage_with_scores(kb_dir):
    kb = rag.KnowledgeBase(rag.RagConfig(knowledge_dir=str(kb_dir), top_k=2))
    assert kb.files == ["hours.txt", "manual.md", "promotions.md"]  # the .pdf is not read
    found = kb.search("汉堡机报错 E-03 怎么办？")
    assert len(found) <= 2 and found[0].heading.startswith("报错 E-03")
    assert found[0].score > 0 and all(a.score >= b.score for a, b in zip(found, found[1:]))
    assert kb.search("这周的特价是什么？", k=1)[0].chunk_id == "promotions.md#1"
    assert kb.search("When do you open?")[0].file == "hours.txt"
    assert kb.search("量子物理") == []  # no word in common: nothing, rather than noise


def test_context_drops_passages_far_below_the_best(kb_dir):
    loose = rag.KnowledgeBase(rag.RagConfig(knowledge_dir=str(kb_dir), top_k=3, min_relative_score=0))
    strict = rag.KnowledgeBase(rag.RagConfig(knowledge_dir=str(kb_dir), top_k=3, min_relative_score=0.99))
    question = "报错 E-07 传送带"
    assert len(loose.context(question)) > 1
    assert [p.chunk_id for p in strict.context(question)] == [loose.context(question)[0].chunk_id]


def test_editing_adding_and_removing_files_rebuilds_the_index(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    first = kb.fingerprint
    assert kb.builds == 1 and kb.refresh() is False and kb.builds == 1  # nothing changed: no rebuild
    assert "海藻圈" in kb.search("这周的特价是什么？")[0].text

    promotions = kb_dir / "promotions.md"
    promotions.write_text(PROMOTIONS.replace("「海藻圈买二送一」，3.00 贝壳币三份海藻圈",
                                             "「海浪汽水买一送一」，1.00 贝壳币两杯"),
                          encoding="utf-8")
    top = kb.search("这周的特价是什么？")[0]  # search notices the edit by itself
    assert kb.builds == 2 and kb.fingerprint != first
    assert "海浪汽水" in top.text and "海藻圈" not in top.text

    (kb_dir / "faq.md").write_text("## 外卖\n\n我们不送外卖，只有堂食和外带。\n", encoding="utf-8")
    assert kb.search("送外卖吗")[0].file == "faq.md" and kb.builds == 3
    (kb_dir / "faq.md").unlink()
    assert kb.refresh() is True and "faq.md" not in kb.files and kb.builds == 4
    assert all(p.file != "faq.md" for p in kb.search("送外卖吗"))


@pytest.mark.parametrize("setup, words", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "has no .md or .txt files"),
    (lambda d: (d / "a.pdf").write_bytes(b"x") and d, "has no .md or .txt files"),
    (lambda d: (d / "a.md").write_text("\n\n# \n", encoding="utf-8") and d, "hold no text"),
    (lambda d: (d / "a.txt").write_bytes("价格".encode("gbk")) and d, "is not UTF-8"),
])
def test_a_bad_knowledge_folder_is_one_sentence(tmp_path, setup, words):
    folder = setup(tmp_path)
    with pytest.raises(ConchError) as e:
        rag.KnowledgeBase(str(folder))
    assert words in str(e.value) and one_sentence(str(e.value))


def test_a_folder_emptied_later_is_one_sentence_too(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    for path in kb_dir.iterdir():
        path.unlink()
    with pytest.raises(ConchError, match="has no .md or .txt files"):
        kb.search("特价")


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_k_must_be_a_positive_whole_number(kb_dir, k):
    kb = rag.KnowledgeBase(str(kb_dir))
    with pytest.raises(ConchError, match="at least 1") as e:
        kb.search("特价", k=k)
    assert one_sentence(str(e.value))
    with pytest.raises(ConchError, match="top_k"):
        rag.KnowledgeBase(rag.RagConfig(knowledge_dir=str(kb_dir), top_k=0))


# -- the prompt ------------------------------------------------------------------------------------


def test_the_prompt_puts_the_passages_before_the_question(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    passages = kb.search("这周的特价是什么？")
    prompt = rag.build_prompt("这周的特价是什么？", passages)
    assert prompt.index("海藻圈买二送一") < prompt.index("问题：这周的特价是什么？")
    assert rag.NOT_FOUND_ZH in prompt and prompt.startswith("资料：\n[1] ")
    english = rag.build_prompt("What is on special?", passages)
    assert english.startswith("Documents:\n[1] ") and rag.NOT_FOUND_EN in english
    assert english.rstrip().endswith("Question: What is on special?")
    assert "没有找到相关资料" in rag.build_prompt("量子物理？", [])
    many = [rag.Passage("a.md", "h", f"a.md#{i}", "蟹" * 100) for i in range(10)]
    assert rag.build_prompt("蟹？", many, max_context_chars=250).count("[") == 2  # the context is capped


def test_with_context_rewrites_only_the_last_question(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    messages = [{"role": "system", "content": "你是神奇海螺。"}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "汉堡机报错 E-07"}]
    out, passages = rag.with_context(messages, kb)
    assert out[:3] == messages[:3] and len(out) == 4
    assert passages[0].heading.startswith("报错 E-07") and out[3]["content"].endswith("问题：汉堡机报错 E-07")
    with pytest.raises(ConchError):
        rag.with_context([{"role": "system", "content": "x"}], kb)


FOLLOW_UP = [{"role": "user", "content": "这周的特价是什么？"},
             {"role": "assistant", "content": "这周的特价是「海藻圈买二送一」。"},
             {"role": "user", "content": "那它多少钱？"}]


def test_the_conversation_query_weights_the_latest_user_turns():
    assert rag.conversation_query(FOLLOW_UP) == "这周的特价是什么？\n那它多少钱？\n那它多少钱？"
    assert rag.conversation_query(FOLLOW_UP, turns=1, latest_weight=1) == "那它多少钱？"
    many = [{"role": "user", "content": str(i)} for i in range(5)]
    assert rag.conversation_query(many, turns=3, latest_weight=3) == "2\n3\n4\n4\n4"  # older turns drop out
    assert "海藻圈" not in rag.conversation_query(FOLLOW_UP)  # the model's own words are not searched
    with pytest.raises(ConchError, match="role 'user'"):
        rag.conversation_query([{"role": "assistant", "content": "x"}])
    with pytest.raises(ConchError, match="at least 1"):
        rag.conversation_query(FOLLOW_UP, turns=0)


def test_a_follow_up_retrieves_with_the_conversation(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    assert kb.search("那它多少钱？") == []  # alone, the follow-up has nothing to search with
    out, passages = rag.with_context(FOLLOW_UP, kb)
    assert passages[0].chunk_id == "promotions.md#1" and "3.00 贝壳币" in out[-1]["content"]
    assert out[-1]["content"].endswith("问题：那它多少钱？") and out[:2] == FOLLOW_UP[:2]
    assert rag.with_context(FOLLOW_UP, kb, turns=1)[1] == []  # the old way: the last message only
    # a new topic still comes first: the latest question counts twice
    switched = FOLLOW_UP[:2] + [{"role": "user", "content": "传送带卡住了"}]
    assert rag.with_context(switched, kb)[1][0].heading.startswith("报错 E-07")
    with pytest.raises(ConchError, match="query_turns"):
        rag.KnowledgeBase(rag.RagConfig(knowledge_dir=str(kb_dir), query_turns=0))


# -- retrieval quality -----------------------------------------------------------------------------


def test_hit_rate_counts_the_expected_passage_in_the_top_k(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    cases = [{"question": "这周的特价是什么？", "file": "promotions.md", "heading": "本周特价"},
             {"question": "传送带卡住了", "file": "manual.md", "heading": "E-07"},
             {"question": "传送带卡住了", "file": "manual.md", "heading": "E-03"}]  # the wrong passage
    rate, rows = rag.hit_rate(kb, cases, k=1)
    assert rate == pytest.approx(2 / 3) and [r["rank"] for r in rows] == [1, 1, None]
    with pytest.raises(ConchError):
        rag.hit_rate(kb, [], k=3)


def test_hit_rate_accepts_alternative_headings(kb_dir):
    kb = rag.KnowledgeBase(str(kb_dir))
    case = {"question": "传送带卡住了", "file": "manual.md", "heading": ["E-03", "E-07"]}
    assert rag.hit_rate(kb, [case], k=1)[0] == 1.0


def test_the_shipped_knowledge_base_finds_its_answers():
    kb = rag.KnowledgeBase(str(REPO / "data/knowledge"))
    cases = rag.load_eval(REPO / "data/knowledge_eval.json")
    rate, rows = rag.hit_rate(kb, cases, k=3)
    assert len(cases) >= 15 and rate >= 0.9, [r for r in rows if r["rank"] is None]


@pytest.mark.parametrize("name", ["knowledge_eval.json", "knowledge_eval_heldout.json"])
def test_every_eval_question_names_a_passage_that_holds_its_fact(name):
    """The data is right: each expected passage exists and contains the fact its answer must hold
    (whether retrieval finds it is what the hit rate measures, not this test)."""
    kb = rag.KnowledgeBase(str(REPO / "data/knowledge"))
    cases = rag.load_eval(REPO / "data/knowledge_eval.json" if name == "knowledge_eval.json"
                          else REPO / "data" / name)
    assert len(cases) >= 20 and all("fact" in c for c in cases)
    for case in cases:
        headings = [case["heading"]] if isinstance(case["heading"], str) else case["heading"]
        wanted = [p for p in kb.passages if p.file == case["file"] and any(h in p.heading for h in headings)]
        assert any(rag.contains_fact(p.heading + p.text, case["fact"]) for p in wanted), case


def test_the_held_out_questions_do_not_copy_the_originals():
    original = {c["question"] for c in rag.load_eval(REPO / "data/knowledge_eval.json")}
    held_out = [c["question"] for c in rag.load_eval(REPO / "data/knowledge_eval_heldout.json")]
    assert not original & set(held_out) and len(set(held_out)) == len(held_out)


# -- answer quality --------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, fact, expected", [
    ("这周的特价是「海藻圈买二送一」，3.00 贝壳币三份。", "3.00", True),
    ("Three Kelp Rings for $3", "3.00", True),  # the same number, written differently
    ("双层蟹堡 13.00 贝壳币", "3", False),  # a number inside another does not count
    ("加芝士每片 0.5 贝壳币", "0.50", True),
    ("３．００ 贝壳币", "3", True),  # full-width digits
    ("6 月 6 日起上市", "6月6日", True),  # spaces do not matter
    ("2025-06-06 起", ["6月6日", "06-06"], True),  # any of the alternatives
    ("We close at 9 PM.", ["21", "9pm"], True),
    ("This week's special is the KELP RINGS deal", "kelp ring", True),
    ("海带奶昔 1.75 贝壳币", "1.25", False),
    ("", "海藻圈", False),
])
def test_contains_fact_normalises_digits_and_whitespace(answer, fact, expected):
    assert rag.contains_fact(answer, fact) is expected


def test_score_answers_asks_with_and_without_retrieval(tiny_r1, kb_dir, monkeypatch):
    from conch import chat

    model, tokenizer = chat.load(tiny_r1)
    kb = rag.KnowledgeBase(str(kb_dir))
    cases = [{"question": "这周的特价是什么？", "file": "promotions.md", "heading": "本周特价", "fact": "3.00"},
             {"question": "传送带卡住了", "file": "manual.md", "heading": "E-07", "fact": "复位"},
             {"question": "没有事实的问题", "file": "manual.md", "heading": "E-07"}]  # no fact: not scored
    seen = []

    def fake_generate(model, tokenizer, prompts, gen):  # answers by copying what it was given
        seen.append(len(prompts))
        return [chat.Reply("", "", m[-1]["content"][:60], 0, 0, "stop") for m in prompts]

    monkeypatch.setattr(chat, "generate", fake_generate)
    score = rag.score_answers(model, tokenizer, kb, cases, batch_size=1)
    assert seen == [1, 1, 1, 1]  # two questions, alone and with RAG, one a batch
    assert [r["question"] for r in score.rows] == ["这周的特价是什么？", "传送带卡住了"]
    assert score.rows[0]["rag_ok"] and not score.rows[0]["alone_ok"]  # the fact was only in the passages
    assert score.rows[0]["sources"][0] == "promotions.md#1"
    assert score.with_rag >= 0.5 and score.alone == 0.0
    with pytest.raises(ConchError, match="fact"):
        rag.score_answers(model, tokenizer, kb, cases[2:])


# -- with a model ----------------------------------------------------------------------------------


def test_ask_puts_the_passages_into_what_the_model_reads(tiny_r1, kb_dir):
    from conch import chat

    model, tokenizer = chat.load(tiny_r1)
    kb = rag.KnowledgeBase(str(kb_dir))
    gen = chat.GenConfig(max_new_tokens=4, temperature=0)
    with_rag = rag.ask(model, tokenizer, "这周的特价是什么？", kb, gen)
    alone = rag.ask(model, tokenizer, "这周的特价是什么？", None, gen)
    assert with_rag.passages[0].chunk_id == "promotions.md#1" and "3.00 贝壳币" in with_rag.prompt
    assert alone.passages == [] and alone.prompt == "这周的特价是什么？"
    assert isinstance(with_rag.answer, str)


# -- the server in RAG mode ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rag_server(tiny_r1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "knowledge"
    folder.mkdir()
    (folder / "promotions.md").write_text(PROMOTIONS, encoding="utf-8")
    (folder / "manual.md").write_text(MANUAL, encoding="utf-8")
    with running_server(tiny_r1, "--rag_dir", str(folder), "--max_tokens_limit", "8") as url:
        yield url, folder


def ask_chat(url, content, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_served_answers_carry_their_sources(rag_server):
    url, _ = rag_server
    r = ask_chat(url, "汉堡机报错 E-03 怎么办？")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "sources"}
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] <= 4
    top = body["sources"][0]
    assert set(top) == {"file", "heading", "chunk_id", "score", "text"}
    assert top["file"] == "manual.md" and top["heading"].startswith("报错 E-03") and top["score"] > 0
    plain = ask_chat(url, "汉堡机报错 E-03 怎么办？", rag=False).json()
    assert "sources" not in plain  # rag off: the usual shape, and a shorter prompt without passages
    assert plain["usage"]["prompt_tokens"] < body["usage"]["prompt_tokens"]

    generated = httpx.get(url + "/generate", params={"prompt": "这周的特价是什么？", "max_new_tokens": 4},
                          timeout=60).json()
    assert {"generated_text", "reasoning", "finish_reason", "usage"} < set(generated)
    assert generated["sources"][0]["chunk_id"] == "promotions.md#1"
    health = httpx.get(url + "/health").json()
    assert health["knowledge"]["files"] == 2 and health["status"] == "ok"


def test_a_streamed_answer_sends_the_sources_first(rag_server):
    url, _ = rag_server
    body = {"messages": [{"role": "user", "content": "传送带卡住了"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[0]["sources"][0]["heading"].startswith("报错 E-07")
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("sources" not in e for e in events[1:]) and events[-1]["choices"][0]["finish_reason"]


def test_the_server_follows_edits_without_a_restart(rag_server):
    url, folder = rag_server
    promotions = folder / "promotions.md"
    original = promotions.read_text(encoding="utf-8")
    try:
        promotions.write_text(original.replace("海藻圈买二送一", "珊瑚脆脆半价"), encoding="utf-8")
        top = ask_chat(url, "这周的特价是什么？").json()["sources"][0]
        assert "珊瑚脆脆半价" in top["text"] and "海藻圈买二送一" not in top["text"]
        for path in folder.iterdir():
            path.rename(path.with_suffix(".bak"))
        r = ask_chat(url, "这周的特价是什么？")
        assert r.status_code == 500 and "has no .md or .txt files" in r.json()["error"]["message"]
        assert one_sentence(r.json()["error"]["message"])
    finally:
        for path in folder.iterdir():
            path.rename(path.with_suffix(".md"))
        promotions.write_text(original, encoding="utf-8")
    assert "海藻圈买二送一" in ask_chat(url, "这周的特价是什么？").json()["sources"][0]["text"]


def test_the_server_retrieves_a_follow_up_with_the_conversation(rag_server):
    url, _ = rag_server
    body = {"messages": FOLLOW_UP, "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["sources"][0]["chunk_id"] == "promotions.md#1"
    assert "3.00 贝壳币" in r.json()["sources"][0]["text"]
    alone = ask_chat(url, "那它多少钱？").json()  # the last message alone finds nothing
    assert alone["sources"] == []


def test_rag_on_a_server_without_knowledge_is_a_400(tiny_r1):
    with running_server(tiny_r1, "--max_tokens_limit", "4") as url:
        r = ask_chat(url, "这周的特价是什么？", rag=True)
        assert r.status_code == 400 and "--rag_dir" in r.json()["error"]["message"]
        assert one_sentence(r.json()["error"]["message"])
        assert "sources" not in ask_chat(url, "这周的特价是什么？").json()  # default: off


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "has no .md or .txt files"),
])
def test_serving_a_bad_knowledge_folder_exits_2_in_one_line(tiny_r1, tmp_path, make, words):
    result = subprocess.run([sys.executable, "-m", "conch", "serve", "--model", str(tiny_r1),
                             "--rag_dir", str(make(tmp_path)), "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and words in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ('[{"question": "q", "file": "a.md"', "not valid JSON"),
    ('{"question": "q"}', "must hold a JSON list"),
    ('["q"]', "is not an object"),
    ('[{"question": "q", "file": "a.md"}]', "lacks heading"),
    ('[{"question": "q", "file": "a.md", "heading": []}]', "heading must be"),
    ('[{"question": "q", "file": "a.md", "heading": "h", "fact": 3}]', "fact must be"),
])
def test_bad_eval_files_are_one_sentence(tmp_path, text, message):
    path = tmp_path / "eval.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConchError, match=message):
        rag.load_eval(path)
