"""Which of two manners an answer is written in, scored without a judge model (notebook 10's DPO).

``style_score`` is the share of answers carrying the playful style's markers (嘿嘿～, ✨ …) and the dry style's
(综上所述 …), where an answer counts only if it is a real answer (`degenerate`: enough words besides the markers,
no loop, no flood of one marker), so "Yay~ Hehe~ Hehe~" is not scored as playful.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from .errors import ConchError

# the two styles' markers, as written in data/magic_conch_dpo.json (data/README.md): the chosen, playful style
# and the rejected, dry one
PLAYFUL_MARKERS = ("嘿嘿", "哇～", "好耶", "诶嘿", "～", "Hehe", "Yay", "Ooh", "~", "✨", "(≧▽≦)",
                   "(๑•̀ㅂ•́)و✧", "☆")
DRY_MARKERS = ("综上所述", "根据", "首先", "其次", "因此", "值得注意的是", "In summary", "According to",
               "Firstly", "Therefore", "It should be noted that")
# an answer counts for a style only when it is also an answer: at least MIN_CONTENT words besides the
# markers (a Chinese character is a word), its word 3-grams at least MIN_DISTINCT3 distinct (no loop), and
# no marker more than MAX_MARKER_REPEAT times (no "☆ ☆ ☆ …"). Set on data/magic_conch_dpo.json: every chosen
# and rejected answer there passes (fewest words 12, lowest distinct-3 0.80, a marker at most 3 times); the
# demo model's "Yay~ Hehe~ Hehe~" has 0 words, its "我是…的智能助手，…的智能助手，…" has 0.62 distinct
# 3-grams, its "A 2.99 ☆ 1.99 ☆ ☆ …" 15 stars.
MIN_CONTENT = 4
MIN_DISTINCT3 = 0.7
MAX_MARKER_REPEAT = 4
_MARKER = re.compile("|".join(re.escape(m) for m in sorted(PLAYFUL_MARKERS + DRY_MARKERS, key=len, reverse=True)),
                     re.IGNORECASE)
_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+(?:'[A-Za-z]+)?")


def markers(text: str) -> tuple[list[str], list[str]]:
    """The chosen-style and rejected-style markers found in ``text``."""
    return [m for m in PLAYFUL_MARKERS if m in text], [m for m in DRY_MARKERS if m in text]


def content_words(text: str) -> list[str]:
    """The words of ``text`` once the style markers are removed (Chinese characters one by one), lowercased."""
    return [w.lower() for w in _WORD.findall(_MARKER.sub(" ", text))]


def distinct_n(words: list[str], n: int = 3) -> float:
    """Distinct n-grams / all n-grams (1.0 for a text too short to have one): low means the text loops."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def degenerate(text: str) -> str:
    """Why ``text`` is not a real answer ("" when it is one): too few words besides the style markers,
    looping, or one marker again and again."""
    words = content_words(text)
    if len(words) < MIN_CONTENT:
        return f"{len(words)} words besides the markers (fewer than {MIN_CONTENT})"
    if distinct_n(words) < MIN_DISTINCT3:
        return f"repeats itself (distinct 3-grams {distinct_n(words):.2f} < {MIN_DISTINCT3})"
    counts = Counter(m.lower() for m in _MARKER.findall(text))
    if counts and max(counts.values()) > MAX_MARKER_REPEAT:
        marker, times = counts.most_common(1)[0]
        return f"'{marker}' {times} times (more than {MAX_MARKER_REPEAT})"
    return ""


@dataclass
class StyleScore:
    playful: float  # share of answers with a chosen-style marker that are real answers (not degenerate)
    dry: float  # share of answers with a rejected-style marker that are real answers
    n: int
    degenerate: float = 0.0  # share of answers that are not real answers (counted for neither style)

    @property
    def score(self) -> float:
        """playful - dry: +1 all playful, -1 all dry; degenerate answers count for neither."""
        return self.playful - self.dry

    def __str__(self) -> str:
        return (f"playful {self.playful:.0%}, dry {self.dry:.0%}, degenerate {self.degenerate:.0%}, "
                f"style score {self.score:+.2f} (n={self.n})")


def style_score(answers: list[str]) -> StyleScore:
    """The share of answers in each style. An answer with markers but no content, a loop or a flood of
    markers ("Yay~ Hehe~ Hehe~") is degenerate and counts for neither style."""
    if not answers:
        raise ConchError("style_score needs at least one answer.")
    ok = [not degenerate(a) for a in answers]
    found = [markers(a) for a in answers]
    n = len(answers)
    return StyleScore(sum(bool(p) and g for (p, _), g in zip(found, ok)) / n,
                      sum(bool(d) and g for (_, d), g in zip(found, ok)) / n, n, ok.count(False) / n)
