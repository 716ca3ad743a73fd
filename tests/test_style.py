"""The style score (conch.style): markers of the two manners, and degenerate answers counted for neither."""

import pytest

from conch import style
from conch.errors import ConchError


def test_style_score_counts_markers():
    score = style.style_score(["嘿嘿～当然可以，马上来 ✨", "综上所述，可以点单。", "好的，马上来。",
                               "Hehe~ sure thing, right away ☆"])
    assert (score.playful, score.dry, score.n, score.degenerate) == (0.5, 0.25, 4, 0.0)
    assert score.score == pytest.approx(0.25)
    assert style.markers("In summary, yes. Therefore ok.") == ([], ["In summary", "Therefore"])
    with pytest.raises(ConchError):
        style.style_score([])


def test_style_score_does_not_count_degenerate_answers():
    playful = "嘿嘿～美味蟹堡 2.99 贝壳币，加芝士再加 0.50 哦～✨"
    score = style.style_score([playful, "Yay~ Hehe~ Hehe~"])
    assert score.playful == 0.5 and score.degenerate == 0.5, "markers alone are not a playful answer"
    assert style.degenerate("Yay~ Hehe~ Hehe~").startswith("0 words")
    assert style.degenerate(playful) == ""


@pytest.mark.parametrize("answer, why", [
    ("Yay~ Hehe~ Hehe~ Hehe~ (๑•̀ㅂ•́)✧", "0 words"),
    ("Hehe~ sure ☆", "1 words"),
    # the demo model's loop after SFT: the same phrase again and again
    ("我是神奇海螺（Magic Conch），蟹堡王（Krusty Krab）的智能助手！"
     "我是蟹堡王的智能助手，蟹堡王的智能助手，蟹堡王的智", "repeats"),
    ("I'm the Magic Conch, the Krusty Krab's own assistant. I'm the Magic Conch, the Krusty Krab's own ass", "repeats"),
    ("A 2.99 ☆ 1.99 ☆ ☆ 2.99 ☆ ☆ ☆ 2.99 ☆ ☆ 3.99 ☆ ☆ 4.99 ☆ 5.99 ☆ 6.99 ☆ 7.99 ☆ 8.99 ☆", "'☆' 15 times"),
])
def test_degenerate_answers_say_why(answer, why):
    assert why in style.degenerate(answer)


def test_real_answers_of_both_styles_count():
    assert style.style_score(["哇～海浪汽水 1.50 贝壳币～(≧▽≦)"]).playful == 1
    dry = style.style_score(["根据菜单，海浪汽水售价为 1.50 贝壳币。综上所述，一杯 1.50 贝壳币。"])
    assert dry.dry == 1 and dry.score == -1
    # an answer without markers is neither style, and not degenerate
    plain = style.style_score(["海浪汽水一杯 1.50 贝壳币。"])
    assert (plain.playful, plain.dry, plain.degenerate) == (0, 0, 0)
    assert style.content_words("Yay~ 好耶！Sure") == ["sure"]
    assert style.distinct_n(["a", "b", "a", "b", "a", "b"], 3) == pytest.approx(2 / 4)
