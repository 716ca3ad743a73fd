"""Stage 8: retrieval-augmented generation (RAG, 检索增强生成) over the Krusty Krab's own files.

Fine-tuning puts stable knowledge into the weights. This week's promotions change every Monday,
so they stay in files (``data/knowledge/``) and are looked up when a question comes:

1. **chunk**: every ``.md`` / ``.txt`` file under the folder is cut into short passages, one
   Markdown section each (split again at paragraphs past ``chunk_chars``), each remembering its
   file and heading;
2. **index**: BM25 (the ``bm25s`` library) over tokens: Chinese words from ``jieba`` (with their
   sub-words, ``cut_for_search``), lower-cased English words and error codes such as ``E-03``;
3. **retrieve**: the ``top_k`` passages with their BM25 scores; a passage that shares no word
   with the question scores 0 and is left out;
4. **prompt**: the passages go before the question, with the instruction to answer only from
   them and to say so when they do not hold the answer.

In a conversation the search uses the recent user turns, not only the last one
(`conversation_query`): after "这周的特价是什么？", the follow-up "那它多少钱？" has no word of
its own to search with.

Quality is measured twice: retrieval (`hit_rate`: is the right passage in the top k?) and
answers (`contains_fact` / `score_answers`: does the answer hold the expected fact?).

`KnowledgeBase` hashes the files' contents before every search and rebuilds the index when the
hash changes (a file edited, added or removed): edit ``promotions.md`` and the next answer uses
it, with no training.

Everything here runs offline: jieba ships its dictionary inside its wheel and bm25s needs only
numpy. Dense embeddings (sentence-transformers) are not used: the one embedding model this
project can get offline (all-MiniLM-L6-v2) is English-only and the knowledge base is mostly
Chinese; for the few dozen passages of one restaurant, BM25 over words finds the right passage
(notebook 09 measures the hit rate).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ConchError

SUFFIXES = (".md", ".txt")
NOT_FOUND_ZH = "资料里没有这个信息"
NOT_FOUND_EN = "The documents do not say"
_CJK = re.compile(r"[\u3400-\u9fff]")
# error codes (E-03, e03), English words, numbers (3.29), runs of Chinese characters
_PIECES = re.compile(r"\be\s?-?\s?\d{2}\b|[a-z]+|\d+(?:\.\d+)?|[\u3400-\u9fff]+")
_STOP = set("的 了 吗 呢 吧 啊 呀 是 在 有 和 与 及 或 就 都 也 还 要 会 能 可以 我 你 他 她 它 "
            "我们 你们 这 那 这个 那个 "
            "什么 怎么 怎么办 怎样 如何 哪 哪些 哪个 多少 几 请问 请 一下 一个 吗 呢 么 给 让 把 被 "
            "a an the is are was were be to of in on at for and or with by from as it its this that "
            "these those what which who how do does did i you we can could should would please there "
            "me my your our any s t".split())


@dataclass
class RagConfig:
    knowledge_dir: str = "data/knowledge"  # a folder of .md / .txt files (read recursively)
    top_k: int = 3  # passages put in front of the question
    chunk_chars: int = 300  # a section longer than this is split at paragraphs, then sentences
    max_context_chars: int = 1200  # passages past this many characters are left out of the prompt
    # a passage scoring below this share of the best one stays out of the prompt: weak matches
    # distract a small model more than they help it (0 keeps all top_k)
    min_relative_score: float = 0.5
    # retrieval in a conversation: the last ``query_turns`` user messages, the latest counted
    # ``latest_weight`` times (1 turn: the last message only)
    query_turns: int = 3
    latest_weight: int = 2


@dataclass
class Passage:
    file: str  # relative to the knowledge folder, e.g. "promotions.md"
    heading: str  # the Markdown section it comes from (a .txt file: its first line)
    chunk_id: str  # "promotions.md#1": the file and the passage's number in it
    text: str  # the passage itself, without its heading
    score: float = 0.0  # BM25 score for the question (higher: more relevant)
    title: str = ""  # the file's "# title", indexed with the passage but not shown

    def source(self, snippet_chars: int = 160) -> dict:
        """What a client sees of a passage: where it comes from, its score and the start of its text."""
        snippet = self.text if len(self.text) <= snippet_chars else self.text[:snippet_chars].rstrip() + "…"
        return {"file": self.file, "heading": self.heading, "chunk_id": self.chunk_id,
                "score": round(self.score, 3), "text": snippet}


# ---------------------------------------------------------------------------------------------
# tokens


_jieba = None


def _words(chinese: str) -> list[str]:
    global _jieba
    if _jieba is None:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict…" lines
        _jieba = jieba.Tokenizer()  # our own instance: jieba's global dictionary stays untouched
    return list(_jieba.cut_for_search(chinese))


def tokenize(text: str) -> list[str]:
    """Search tokens: jieba words (and sub-words) for Chinese, words for English, codes, numbers.

    ``tokenize("汉堡机报错 E-03 怎么办")`` → ``['汉堡', '机', '报错', 'e-03']``
    """
    tokens = []
    for piece in _PIECES.findall(text.lower()):
        if _CJK.match(piece):
            tokens += [w for w in _words(piece) if w not in _STOP]
        elif piece[0] == "e" and piece[-1].isdigit():
            tokens.append("e-" + piece[-2:])
        elif piece not in _STOP:
            # a light plural fold, so that "promotions" finds "promotion"
            tokens.append(piece[:-1] if len(piece) > 3 and piece.endswith("s") and not piece.endswith("ss") else piece)
    return tokens


# ---------------------------------------------------------------------------------------------
# chunks


def _split_long(text: str, limit: int) -> list[str]:
    """Paragraphs packed into pieces of at most ``limit`` characters; a longer paragraph is cut at
    sentence ends (a single sentence longer than ``limit`` stays whole)."""
    pieces: list[str] = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        parts = [para] if len(para) <= limit else [s for s in re.split(r"(?<=[。！？])\s*|(?<=[.!?])\s+", para) if s]
        for part in parts:
            if pieces and len(pieces[-1]) + 1 + len(part) <= limit:
                pieces[-1] += "\n" + part
            else:
                pieces.append(part)
    return pieces


def _markdown_sections(text: str) -> list[tuple[str, str, str]]:
    """(document title, section heading, section body) for each section of a Markdown file."""
    title, heading, body, sections, fenced = "", "", [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if match:
            sections.append((title, heading, "\n".join(body)))
            heading, body = match.group(2), []
            if len(match.group(1)) == 1 and not title:
                title = heading
        else:
            body.append(line)
    sections.append((title, heading, "\n".join(body)))
    return [(t, h, b.strip()) for t, h, b in sections if b.strip()]


def chunk_file(path: Path, root: Path, chunk_chars: int = 300, data: bytes | None = None) -> list[Passage]:
    """The passages of one knowledge file (``data``: its bytes, when they were read already)."""
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except UnicodeDecodeError:
        raise ConchError(f"knowledge file {path} is not UTF-8 text; save it as UTF-8.") from None
    rel = path.relative_to(root).as_posix()
    if path.suffix.lower() == ".md":
        sections = _markdown_sections(text)
    else:  # plain text: the first line is the title, the rest its body
        first, _, rest = text.strip().partition("\n")
        sections = [("", first.strip(), rest.strip() or first.strip())] if first.strip() else []
    passages = []
    for title, heading, body in sections:
        for piece in _split_long(body, chunk_chars):
            passages.append(Passage(rel, heading or title or path.stem, f"{rel}#{len(passages)}", piece, title=title))
    return passages


# ---------------------------------------------------------------------------------------------
# the knowledge base


class KnowledgeBase:
    """The passages of a knowledge folder and their BM25 index, rebuilt when the files change.

        kb = KnowledgeBase(RagConfig(knowledge_dir="data/knowledge"))
        for p in kb.search("这周有什么特价？"):
            print(p.score, p.file, p.heading)
    """

    def __init__(self, cfg: RagConfig | str | Path | None = None):
        self.cfg = cfg if isinstance(cfg, RagConfig) else RagConfig(knowledge_dir=str(cfg or RagConfig.knowledge_dir))
        if self.cfg.top_k < 1:
            raise ConchError(f"top_k (--rag_top_k when serving) must be at least 1, got {self.cfg.top_k}.")
        if not 0 <= self.cfg.min_relative_score <= 1:
            raise ConchError(f"min_relative_score must be between 0 and 1, got {self.cfg.min_relative_score}.")
        if self.cfg.chunk_chars < 20:
            raise ConchError(f"chunk_chars must be at least 20, got {self.cfg.chunk_chars}.")
        if self.cfg.query_turns < 1 or self.cfg.latest_weight < 1:
            raise ConchError(f"query_turns and latest_weight must be at least 1, got {self.cfg.query_turns} "
                             f"and {self.cfg.latest_weight}.")
        self.dir = Path(self.cfg.knowledge_dir)
        self.fingerprint: str | None = None  # sha256 of every file's path and content
        self.builds = 0  # how often the index was (re)built
        self.passages: list[Passage] = []
        self.files: list[str] = []
        self._index = None
        self.refresh()

    def list_files(self) -> list[Path]:
        if not self.dir.is_dir():
            raise ConchError(f"knowledge folder {self.dir} does not exist; create it with .md or .txt files "
                             "(data/knowledge/ has examples) or point knowledge_dir / --rag_dir at one.")
        files = sorted(p for p in self.dir.rglob("*")
                       if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
        if not files:
            raise ConchError(f"knowledge folder {self.dir} has no .md or .txt files; add some "
                             "(one topic a file, e.g. promotions.md).")
        return files

    def refresh(self) -> bool:
        """Rebuild the index if any file was edited, added or removed since the last build; True if it did."""
        files = self.list_files()
        digest, contents = hashlib.sha256(), []
        for path in files:
            try:
                contents.append(path.read_bytes())
            except OSError as e:  # e.g. removed between listing and reading
                raise ConchError(f"could not read knowledge file {path} ({e.strerror}); "
                                 "check it and ask again.") from None
            digest.update(path.relative_to(self.dir).as_posix().encode() + b"\0" + contents[-1] + b"\0")
        fingerprint = digest.hexdigest()
        if fingerprint == self.fingerprint:
            return False
        passages = [p for path, data in zip(files, contents)
                    for p in chunk_file(path, self.dir, self.cfg.chunk_chars, data)]
        corpus = [tokenize(f"{p.title if p.title != p.heading else ''} {p.heading}\n{p.text}") for p in passages]
        if not any(corpus):
            raise ConchError(f"the files in knowledge folder {self.dir} hold no text to search; "
                             "write the facts into them (Markdown sections or paragraphs).")
        import bm25s

        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        self._index, self.passages, self.fingerprint = index, passages, fingerprint
        self.files = [p.relative_to(self.dir).as_posix() for p in files]
        self.builds += 1
        return True

    def search(self, question: str, k: int | None = None) -> list[Passage]:
        """The ``k`` passages (default ``top_k``) that best match the question, best first, with scores."""
        import numpy as np

        k = self.cfg.top_k if k is None else k
        if not isinstance(k, int) or k < 1:
            raise ConchError(f"k must be a whole number of at least 1, got {k!r}.")
        self.refresh()
        tokens = tokenize(question)
        if not tokens:
            return []
        scores = self._index.get_scores(tokens)
        best = np.argsort(-scores, kind="stable")[:k]
        return [replace(self.passages[i], score=float(scores[i])) for i in best if scores[i] > 0]

    def context(self, question: str, k: int | None = None) -> list[Passage]:
        """The passages for the prompt: `search`, without those far below the best (``min_relative_score``)."""
        found = self.search(question, k)
        return [p for p in found if p.score >= self.cfg.min_relative_score * found[0].score]

    def summary(self) -> dict:
        return {"dir": str(self.dir), "files": len(self.files), "passages": len(self.passages),
                "fingerprint": (self.fingerprint or "")[:12], "builds": self.builds}


# ---------------------------------------------------------------------------------------------
# the prompt


def build_prompt(question: str, passages: list[Passage], max_context_chars: int = 1200) -> str:
    """The user message the model sees: the passages, the rule, then the question.

    Chinese questions get Chinese instructions, others English: a small model follows
    instructions in the language of the question better.
    """
    chinese = bool(_CJK.search(question))
    lines, used = [], 0
    for i, p in enumerate(passages, 1):
        line = f"[{i}] {p.heading}：{p.text}" if chinese else f"[{i}] {p.heading}: {p.text}"
        if lines and used + len(line) > max_context_chars:
            break
        lines.append(line)
        used += len(line)
    if chinese:
        context = "\n".join(lines) or "（没有找到相关资料）"
        return (f"资料：\n{context}\n\n请只根据上面的资料回答问题。资料里没有答案时，就回答“{NOT_FOUND_ZH}”。\n"
                f"问题：{question}")
    context = "\n".join(lines) or "(no documents found)"
    return (f"Documents:\n{context}\n\nAnswer the question using only the documents above. "
            f"If they do not contain the answer, say \"{NOT_FOUND_EN}\".\nQuestion: {question}")


def conversation_query(messages: list[dict], turns: int = 3, latest_weight: int = 2) -> str:
    """The text to search with in a conversation: the last ``turns`` user messages, oldest first,
    the latest repeated ``latest_weight`` times (BM25 counts a repeated word again, so the latest
    question's words weigh more; a new topic still wins over the old one).

    ``conversation_query([user "这周的特价是什么？", assistant …, user "那它多少钱？"])``
    → ``"这周的特价是什么？\n那它多少钱？\n那它多少钱？"``: the follow-up alone has only "钱" to
    search with, which no document contains.
    """
    if turns < 1 or latest_weight < 1:
        raise ConchError(f"turns and latest_weight must be at least 1, got {turns} and {latest_weight}.")
    asked = [m["content"] for m in messages if m["role"] == "user"]
    if not asked:
        raise ConchError("messages must contain a message with role 'user' to retrieve for.")
    recent = asked[-turns:]
    return "\n".join(recent[:-1] + [recent[-1]] * latest_weight)


def with_context(messages: list[dict], kb: KnowledgeBase, k: int | None = None,
                 turns: int | None = None) -> tuple[list[dict], list[Passage]]:
    """Retrieve with the conversation (`conversation_query`: the last ``turns`` user messages, default
    ``kb.cfg.query_turns``; 1 = the last message only) and replace the last user message with the RAG
    prompt for it; earlier turns stay as they were."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ConchError("messages must contain a message with role 'user' to retrieve for.")
    question = messages[last]["content"]
    query = conversation_query(messages, kb.cfg.query_turns if turns is None else turns, kb.cfg.latest_weight)
    passages = kb.context(query, k)
    prompt = build_prompt(question, passages, kb.cfg.max_context_chars)
    return messages[:last] + [{"role": "user", "content": prompt}] + messages[last + 1:], passages


@dataclass
class RagAnswer:
    question: str
    answer: str
    passages: list[Passage]  # [] when asked without retrieval
    prompt: str  # the user message the model saw


def ask(model, tokenizer, question: str, kb: KnowledgeBase | None, gen=None, k: int | None = None,
        history: list[dict] | None = None) -> RagAnswer:
    """Answer ``question`` with retrieval from ``kb``, or without it when ``kb`` is None.

    ``history``: the earlier turns (``{"role", "content"}`` messages); retrieval then uses them too.
    """
    from . import chat

    gen = gen or chat.GenConfig(answer_tokens=96, temperature=0)
    messages = list(history or []) + [{"role": "user", "content": question}]
    passages: list[Passage] = []
    if kb is not None:
        messages, passages = with_context(messages, kb, k)
    reply = chat.generate(model, tokenizer, messages, gen)
    return RagAnswer(question, reply.answer, passages, messages[-1]["content"])


# ---------------------------------------------------------------------------------------------
# retrieval quality


def load_eval(path: str | Path = "data/knowledge_eval.json") -> list[dict]:
    """Questions with the passage that should be found: ``{"question", "file", "heading"}``, and
    optionally the ``fact`` a correct answer contains. ``heading`` (a substring of the passage's
    heading) and ``fact`` may be lists of alternatives (e.g. the Chinese and the English section)."""
    path = Path(path)
    if not path.exists():
        raise ConchError(f"retrieval eval file {path} does not exist; data/knowledge_eval.json is the example.")
    from .data import read_json  # one sentence for malformed JSON, with line and column

    cases = read_json(path)
    if not isinstance(cases, list):
        raise ConchError(f"{path} must hold a JSON list of {{\"question\", \"file\", \"heading\"}} objects.")
    for i, case in enumerate(cases):
        if not isinstance(case, dict):
            raise ConchError(f"{path}: record {i} is not an object; each needs question, file and heading.")
        missing = {"question", "file", "heading"} - set(case)
        if missing:
            raise ConchError(f"{path}: record {i} lacks {', '.join(sorted(missing))}; "
                             "each needs question, file and heading.")
        for key in ("heading", "fact"):
            value = case.get(key, "x")
            if not (isinstance(value, str) and value or isinstance(value, list) and value
                    and all(isinstance(v, str) and v for v in value)):
                raise ConchError(f"{path}: record {i}: {key} must be a non-empty string or a list of them.")
    return cases


def _alternatives(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def hit_rate(kb: KnowledgeBase, cases: list[dict], k: int = 3) -> tuple[float, list[dict]]:
    """The share of questions whose expected passage (file, and heading containing ``heading``) is in the top ``k``."""
    if not cases:
        raise ConchError("no retrieval eval questions given; add some to data/knowledge_eval.json.")
    rows = []
    for case in cases:
        found = kb.search(case["question"], k)
        rank = next((r for r, p in enumerate(found, 1) if p.file == case["file"]
                     and any(h in p.heading for h in _alternatives(case["heading"]))), None)
        rows.append({**case, "rank": rank, "top": [f"{p.file} › {p.heading}" for p in found]})
    return sum(r["rank"] is not None for r in rows) / len(rows), rows


# ---------------------------------------------------------------------------------------------
# answer quality

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_QUOTES = re.compile(r"[\s「」『』“”\"'‘’]+")


def normalise(text: str) -> str:
    """For fact matching: full-width characters folded (NFKC: "３．００" → "3.00", "，" → ","), lower
    case, whitespace and quotation marks removed ("6 月 6 日" → "6月6日", "9 PM" → "9pm")."""
    import unicodedata

    return _QUOTES.sub("", unicodedata.normalize("NFKC", text).lower())


def contains_fact(answer: str, fact: str | list[str]) -> bool:
    """True when the answer holds the fact (any of a list of alternatives).

    A fact that is a number matches a number of equal value in the answer: "3.00" matches "$3" and
    "3.00 贝壳币", not "13.00". Any other fact (a name, a date such as "6月6日") must appear in the
    answer, both normalised (`normalise`).
    """
    text = normalise(answer)
    for alternative in _alternatives(fact):
        wanted = normalise(alternative)
        if _NUMBER.fullmatch(wanted):
            if any(float(n) == float(wanted) for n in _NUMBER.findall(text)):
                return True
        elif wanted and wanted in text:
            return True
    return False


@dataclass
class FactScore:
    with_rag: float  # share of answers holding their fact, with retrieval
    alone: float  # the same without retrieval (the model's own knowledge)
    rows: list[dict]  # question, fact, alone, with_rag (answers), alone_ok, rag_ok, sources


def score_answers(model, tokenizer, kb: KnowledgeBase, cases: list[dict], gen=None,
                  batch_size: int = 8) -> FactScore:
    """Answer every case with and without retrieval (batched, greedy by default) and check each answer
    for the case's ``fact`` with `contains_fact`."""
    from . import chat

    cases = [c for c in cases if "fact" in c]
    if not cases:
        raise ConchError("no questions with a 'fact' to score answers against; add \"fact\" to the eval records.")
    gen = gen or chat.GenConfig(answer_tokens=48, temperature=0)
    plain = [[{"role": "user", "content": c["question"]}] for c in cases]
    grounded = [with_context(m, kb) for m in plain]

    def answers(prompts):
        out = []
        for i in range(0, len(prompts), batch_size):
            out += [r.answer for r in chat.generate(model, tokenizer, prompts[i:i + batch_size], gen)]
        return out

    alone, with_rag = answers(plain), answers([m for m, _ in grounded])
    rows = [{"question": c["question"], "fact": c["fact"], "alone": a, "with_rag": r,
             "alone_ok": contains_fact(a, c["fact"]), "rag_ok": contains_fact(r, c["fact"]),
             "sources": [p.chunk_id for p in passages]}
            for c, a, r, (_, passages) in zip(cases, alone, with_rag, grounded)]
    return FactScore(sum(r["rag_ok"] for r in rows) / len(rows), sum(r["alone_ok"] for r in rows) / len(rows), rows)
