"""R1's reasoning, split from the answer: one parser for whole texts and for streams.

DeepSeek-R1's generation prompt ends in ``<think>\\n``, so its output starts *inside* the think
block: ``…reasoning…</think>\\n\\nanswer``. Other models may write the whole ``<think>…</think>``
themselves, or nothing at all. `split_reasoning` splits a finished text (`conch.chat`,
`conch.evaluate`, the server's plain answers); `ReasoningStream` splits the same text arriving in
pieces (the server's streamed answers) and gives exactly the same two strings, the way vLLM's
reasoning parsers have an ``extract_reasoning_content`` and an ``…_streaming`` method.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """True when the generation prompt itself opens the think block (R1's template since Feb 2025)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def is_reasoning_model(tokenizer) -> bool:
    """True for a model that thinks in ``<think>…</think>`` before it answers (DeepSeek-R1 and its distills).

    Told from its chat template: either the generation prompt opens the think block (R1's
    template since February 2025), or the template handles ``</think>`` in earlier answers
    (R1's January template cuts them to the text after it). A ChatML model such as the demo's
    SmolLM2 does neither.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        return False
    if THINK_CLOSE in template:
        return True
    try:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False,
                                               add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain question is no reasoning one we know
        return False
    return prompt_opens_think(prompt)


def split_reasoning(text: str, prompt_opened_think: bool = False) -> tuple[str, str]:
    """Split generated text into (reasoning, answer), both stripped of surrounding whitespace."""
    opened = prompt_opened_think
    stripped = text.lstrip()
    if stripped.startswith(THINK_OPEN):
        opened, text = True, stripped[len(THINK_OPEN):]
    if THINK_CLOSE in text:
        reasoning, answer = text.split(THINK_CLOSE, 1)
        return reasoning.strip(), answer.strip()
    if opened:  # unclosed: the model was still thinking when it stopped
        return text.strip(), ""
    return "", text.strip()


class ReasoningStream:
    """Route streamed text to reasoning or content; a tag split across pieces is held back.

    ``feed(piece)`` returns the next ``(reasoning, content)`` pieces; ``feed("", final=True)``
    flushes. Joined, they equal ``split_reasoning`` of the whole text.
    """

    def __init__(self, prompt_opened_think: bool):
        self.in_think = prompt_opened_think
        self.started = False
        self.buffer = ""
        self.trim = {"reasoning": _Trim(), "content": _Trim()}

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        reasoning, content = self._route(piece, final)
        return self.trim["reasoning"].feed(reasoning, final), self.trim["content"].feed(content, final)

    def _route(self, piece: str, final: bool) -> tuple[str, str]:
        self.buffer += piece
        reasoning = content = ""
        while self.buffer:
            if not self.started:
                stripped = self.buffer.lstrip()
                if THINK_OPEN.startswith(stripped) and not final and len(stripped) < len(THINK_OPEN):
                    return reasoning, content  # could still become <think>
                if stripped.startswith(THINK_OPEN):
                    self.in_think, self.buffer = True, stripped[len(THINK_OPEN):]
                self.started = True
                continue
            if not self.in_think:
                content, self.buffer = content + self.buffer, ""
                break
            if THINK_CLOSE in self.buffer:
                before, self.buffer = self.buffer.split(THINK_CLOSE, 1)
                reasoning += before
                self.in_think = False
                self.buffer = self.buffer.lstrip("\n")
                continue
            keep = 0 if final else held_back(self.buffer, [THINK_CLOSE])
            reasoning += self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return reasoning, content


ThinkSplitter = ReasoningStream  # the name the server used before


class _Trim:
    """Drops leading whitespace and holds trailing whitespace back until more text follows."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, text: str, final: bool) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.pending + text
        body = text.rstrip()
        self.pending = "" if final else text[len(body):]
        return body


# ---------------------------------------------------------------------------------------------
# stop strings: the one cutter (chat.generate, chat.stream and the engine use it)


def cut_at_stop(text: str, stop: list[str], start: int = 0) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found.

    ``start``: only look for stop strings that end after this index (text before it was checked
    already), so a caller that appends pieces checks each character about once.
    """
    cuts = []
    for s in stop:
        if s:
            i = text.find(s, max(0, start - len(s) + 1))
            if i >= 0:
                cuts.append(i)
    return (text[:min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (not safe to show yet)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest
