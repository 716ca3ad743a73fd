"""conch.evaluate's ROUGE-L and BLEU-4 against rouge-score and sacrebleu (issue 26; dev-only).

The two libraries are in requirements-dev.txt, not requirements.txt: without them these tests skip.

What makes the numbers comparable:

- both sides must see the same tokens. conch.evaluate.tokens lowercases, splits Chinese into single
  characters, keeps other words whole (``i'm`` is one word) and makes every other non-space
  character (punctuation, ✨) a token of its own. So the libraries are given conch's tokens:
  rouge-score through its ``tokenizer=`` hook (with ``use_stemmer=False``, its default), sacrebleu as
  conch's tokens joined by spaces with ``tokenize='none'`` and ``lowercase=False``;
- ROUGE-L: conch's score is rouge-score's ``rougeL`` F-measure (LCS-based, beta 1, one reference);
- BLEU-4: conch's is sacrebleu's ``sentence_bleu`` (its score is 0-100, conch's 0-1) with
  ``smooth_method='add-k', smooth_value=1``: add one to the matches and to the count of the 2-, 3-
  and 4-gram precisions, none to unigrams (sentence BLEU of Lin & Och 2004, NLTK's method2);
  brevity penalty exp(1 - r/c) when the answer is not longer than the reference. sacrebleu's
  effective order (on by default for sentence_bleu) never applies under add-k, since no n-gram count
  is zero.

The libraries' own tokenizers differ from conch's on purpose, and the tests below pin the relation:
on Chinese, sacrebleu's ``tokenize='zh'`` (one token per character, punctuation apart) with
``lowercase=True`` tokenizes as conch does, so the raw texts give the same BLEU; on English,
``'13a'`` agrees except that it keeps decimals (``2.99``) and hyphenated words whole where conch
splits them. rouge-score's default tokenizer drops everything but [a-z0-9], so it scores Chinese
as empty and ignores punctuation: it matches conch only on lowercase-able English without
punctuation.
"""

import random

import pytest

from conch import evaluate

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="dev-only: pip install -r requirements-dev.txt")
sacrebleu = pytest.importorskip("sacrebleu", reason="dev-only: pip install -r requirements-dev.txt")


class _ConchTokens:
    """rouge-score's tokenizer interface around conch.evaluate.tokens."""

    def tokenize(self, text):
        return evaluate.tokens(text)


ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_ConchTokens())

ENGLISH = [
    ("I am the Magic Conch of the Krusty Krab.", "I am the Magic Conch, the assistant of the Krusty Krab."),
    ("The Krabby Patty formula is a secret.", "Sorry, the secret formula of the Krabby Patty cannot be shared!"),
    ("the the the the the the", "The cat sat on the mat"),  # clipped counts
    ("Hello", "Hello"),  # shorter than four tokens
    ("Hello there", "Hello there, friend"),
    ("Yes.", "No, it is not."),
    ("I'm SpongeBob's friend", "i'm spongebob's best friend"),  # apostrophes and case
    ("abc def", "xyz"),  # nothing in common
]
CHINESE = [
    ("我是神奇海螺，蟹堡王的助手", "我是神奇海螺，蟹堡王的智能助手"),
    ("你好", "我是神奇海螺"),
    ("美味蟹堡的秘方是机密，不能告诉你。", "抱歉，美味蟹堡的秘方是蟹老板的商业机密。"),
    ("哈哈哈哈哈", "哈哈"),
    ("我是Magic Conch！✨", "我是神奇海螺 Magic Conch。"),  # mixed: characters and whole English words
    ("海螺", "海螺"),
]


def _random_pairs(n=150, seed=0):
    """Short answers drawn from a small vocabulary, so that n-grams overlap often."""
    rng = random.Random(seed)
    words = ["我", "是", "神", "奇", "海", "螺", "蟹", "堡", "王", "，", "。", "the", "magic", "Conch", "krab", "!"]
    draw = lambda: "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))  # noqa: E731
    return [(draw(), draw()) for _ in range(n)]


def _sacrebleu_on_conch_tokens(candidate, reference):
    joined = lambda s: " ".join(evaluate.tokens(s))  # noqa: E731
    return sacrebleu.sentence_bleu(joined(candidate), [joined(reference)], smooth_method="add-k", smooth_value=1,
                                   tokenize="none", lowercase=False).score / 100


PAIRS = ENGLISH + CHINESE + _random_pairs()


@pytest.mark.parametrize("candidate, reference", PAIRS)
def test_rouge_l_is_rouge_score_on_the_same_tokens(candidate, reference):
    assert evaluate.rouge_l(candidate, reference) == pytest.approx(
        ROUGE.score(reference, candidate)["rougeL"].fmeasure, abs=1e-12)


@pytest.mark.parametrize("candidate, reference", PAIRS)
def test_bleu4_is_sacrebleu_add_one_on_the_same_tokens(candidate, reference):
    assert evaluate.bleu4(candidate, reference) == pytest.approx(_sacrebleu_on_conch_tokens(candidate, reference),
                                                                 abs=1e-9)


@pytest.mark.parametrize("candidate, reference", CHINESE)
def test_chinese_bleu4_is_sacrebleu_zh_on_the_raw_text(candidate, reference):
    """conch's character-level Chinese is sacrebleu's 'zh' tokenizer (lowercased)."""
    got = sacrebleu.sentence_bleu(candidate, [reference], smooth_method="add-k", smooth_value=1, tokenize="zh",
                                  lowercase=True).score / 100
    assert evaluate.bleu4(candidate, reference) == pytest.approx(got, abs=1e-9)


@pytest.mark.parametrize("candidate, reference", ENGLISH)
def test_english_bleu4_is_sacrebleu_13a_on_the_raw_text(candidate, reference):
    got = sacrebleu.sentence_bleu(candidate, [reference], smooth_method="add-k", smooth_value=1, tokenize="13a",
                                  lowercase=True).score / 100
    assert evaluate.bleu4(candidate, reference) == pytest.approx(got, abs=1e-9)


def test_where_the_libraries_tokenize_otherwise():
    """The documented differences: 13a keeps decimals and hyphenated words whole; rouge-score's default
    tokenizer keeps only [a-z0-9] (no Chinese, no punctuation)."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    text = "A Krabby Patty costs $2.99, well-known!"
    assert Tokenizer13a()(text.lower()).split() == ["a", "krabby", "patty", "costs", "$", "2.99", ",", "well-known",
                                                    "!"]
    assert evaluate.tokens(text) == ["a", "krabby", "patty", "costs", "$", "2", ".", "99", ",", "well", "-", "known",
                                     "!"]
    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default.score("我是神奇海螺", "我是神奇海螺")["rougeL"].fmeasure == 0.0  # no tokens at all
    assert evaluate.rouge_l("我是神奇海螺", "我是神奇海螺") == pytest.approx(1.0)
    plain = ("I am the Magic Conch of the Krusty Krab", "I am the magic conch")
    assert evaluate.rouge_l(*plain) == pytest.approx(default.score(plain[1], plain[0])["rougeL"].fmeasure)
