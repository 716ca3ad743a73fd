"""Stage 2: turn a dataset file into tokenized, masked training examples.

Records come in LLaMA-Factory's two formats, registered by name in ``data/dataset_info.json``
or given as a path (``.json`` list or ``.jsonl``):

- alpaca: ``instruction``, ``input``, ``output``, optional ``system`` and ``history``
  (a list of ``[user, assistant]`` pairs);
- sharegpt: ``conversations`` (``from``/``value``) or OpenAI-style ``messages``
  (``role``/``content``), optional ``system``.

Each record becomes chat messages, is rendered with the model's *own* chat template, and every
token but the final answer is masked with -100: the model learns to answer, not to repeat
questions (LLaMA-Factory masks prompts the same way). Earlier answers of a multi-turn record
are context only (LLaMA-Factory's ``mask_history: true``), so every record teaches one answer. The answer is
built exactly the way inference will see it:
the prompt is the template's generation prompt, and the answer is what must follow it. For
DeepSeek-R1 the answer always comes after a think block, and ``reasoning`` chooses which:

- ``drop`` (default): an empty think block, ``<think>\\n\\n</think>\\n\\n`` + answer (the part of
  it the generation prompt already holds is not repeated: the February 2025 template ends in
  ``<think>\\n``). Reasoning written in a record is removed. The tuned model answers at once:
  short, cheap answers, but it also stops reasoning on questions that need it (maths).
- ``keep``: records whose output carries ``<think>…</think>`` (LLaMA-Factory's format) are
  trained with that reasoning; the others with the empty block. The model keeps thinking where
  the data thinks, at the price of longer answers (and a larger ``max_new_tokens``).

For a template without think blocks (the demo's ChatML), ``keep`` trains the
``<think>…</think>`` text as written and ``drop`` trains the answer alone.

Bad data stops before any training with one sentence naming the file, the record and the field.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from .errors import ConchError

IGNORE_INDEX = -100
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the model is not trained

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------------
# reading records


def find_dataset(name: str, dataset_dir: str | Path = "data") -> tuple[Path, dict]:
    """A dataset name registered in ``dataset_info.json``, or a path: returns (file, its entry)."""
    path = Path(name)
    if path.suffix in (".json", ".jsonl") and path.exists():
        return path, {}
    info_path = Path(dataset_dir) / "dataset_info.json"
    if path.suffix in (".json", ".jsonl"):
        raise ConchError(f"dataset file {path} does not exist; check the path.")
    if not info_path.exists():
        raise ConchError(f"dataset '{name}' is not a .json/.jsonl file and {info_path} does not exist; "
                         "give a path or set dataset_dir to the folder that holds dataset_info.json.")
    info = read_json(info_path)
    if name not in info:
        raise ConchError(f"dataset '{name}' is not registered in {info_path}; known: {', '.join(sorted(info))}.")
    entry = info[name]
    if "file_name" not in entry:
        raise ConchError(f"{info_path}: dataset '{name}' has no 'file_name'; add the data file's name.")
    file = Path(dataset_dir) / entry["file_name"]
    if not file.exists():
        raise ConchError(f"{info_path}: dataset '{name}' points to {file}, which does not exist.")
    return file, entry


def read_json(path: Path):
    """A .json file's value, or a .jsonl file's list of rows; a syntax error names its real line.
    UTF-8 with or without a byte-order mark (Windows Notepad writes one) is read; other encodings
    (GBK from Excel or an old editor) end in one sentence."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConchError(f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); save it as UTF-8, e.g. "
                         f"`iconv -f gbk -t utf-8 {path.name} > fixed.json` for a GBK file.") from None
    offset = 0  # lines before the one being parsed (JSONL parses line by line)
    try:
        if path.suffix != ".jsonl":
            return json.loads(text)
        rows = []
        for offset, line in enumerate(text.splitlines()):
            if line.strip():
                rows.append(json.loads(line))
        return rows
    except json.JSONDecodeError as e:
        raise ConchError(f"{path} is not valid JSON: {e.msg} at line {e.lineno + offset}, column {e.colno}; "
                         "fix that spot (a missing comma or quote is the usual cause).") from None


def load_records(name: str, dataset_dir: str | Path = "data", max_samples: int | None = None) -> list[list[dict]]:
    """Read and validate a dataset; each record becomes a list of chat messages ending in the answer."""
    file, entry = find_dataset(name, dataset_dir)
    rows = read_json(file)
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list) or not rows:
        raise ConchError(f"{file} must hold a non-empty JSON list of records.")
    formatting = entry.get("formatting") or ("sharegpt" if isinstance(rows[0], dict) and (
        "conversations" in rows[0] or "messages" in rows[0]) else "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise ConchError(f"dataset '{name}': formatting '{formatting}' is unknown; use alpaca or sharegpt.")
    if max_samples:
        rows = rows[:max_samples]
    convert = _alpaca_messages if formatting == "alpaca" else _sharegpt_messages
    return [convert(row, i, file, entry) for i, row in enumerate(rows)]


def field_value(row: dict, key: str, i: int, file: Path, required: bool) -> str:
    where = f"{file} record {i}"
    if not isinstance(row, dict):
        raise ConchError(f"{where} is a {type(row).__name__}, not an object with fields; fix that record.")
    value = row.get(key)
    if value is None:
        if required:
            raise ConchError(f"{where} has no '{key}' field; add it (it must be non-empty text).")
        return ""
    if not isinstance(value, str):
        raise ConchError(f"{where}: field '{key}' must be text, got {type(value).__name__}; quote it as a string.")
    if required and not value.strip():
        raise ConchError(f"{where}: field '{key}' is empty; write it or remove the record.")
    return value


def _alpaca_messages(row, i, file, entry) -> list[dict]:
    cols = {**ALPACA_COLUMNS, **entry.get("columns", {})}
    instruction = field_value(row, cols["prompt"], i, file, required=True)
    query = field_value(row, cols["query"], i, file, required=False)
    answer = field_value(row, cols["response"], i, file, required=True)
    system = field_value(row, cols["system"], i, file, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = row.get(cols["history"]) or []
    if not isinstance(history, list) or not all(
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) and x.strip() for x in t)
            for t in history):
        raise ConchError(f"{file} record {i}: field '{cols['history']}' must be a list of "
                         "[question, answer] pairs of non-empty text.")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n{query}" if query.strip() else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _sharegpt_messages(row, i, file, entry) -> list[dict]:
    cols = entry.get("columns", {})
    tags = {**SHAREGPT_TAGS, **entry.get("tags", {})}
    key = cols.get("messages") or ("messages" if isinstance(row, dict) and "messages" in row else "conversations")
    turns = row.get(key) if isinstance(row, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ConchError(f"{file} record {i} has no '{key}' list of turns; add one.")
    openai_style = isinstance(turns[0], dict) and "role" in turns[0]
    role_tag, content_tag = ("role", "content") if openai_style else (tags["role_tag"], tags["content_tag"])
    roles = {"user": "user", "assistant": "assistant", "system": "system"} if openai_style else {
        tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
    messages = []
    system = row.get(cols.get("system", "system"))
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns):
        role = roles.get(turn.get(role_tag)) if isinstance(turn, dict) else None
        content = turn.get(content_tag) if isinstance(turn, dict) else None
        if role is None or not isinstance(content, str) or not content.strip():
            raise ConchError(f"{file} record {i}, turn {j}: needs '{role_tag}' (one of {', '.join(roles)}) "
                             f"and non-empty text in '{content_tag}'.")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ConchError(f"{file} record {i}: the last turn must be the assistant's answer.")
    return messages


@dataclass
class Pair:
    """One preference record: the conversation up to the question, a preferred and a rejected answer."""

    messages: list[dict]
    chosen: str
    rejected: str


def load_pairs(name: str, dataset_dir: str | Path = "data", max_samples: int | None = None) -> list[Pair]:
    """Read and validate a preference dataset in LLaMA-Factory's ranking format (alpaca style):
    ``prompt`` (or ``instruction``), optional ``input`` and ``system``, ``chosen``, ``rejected``."""
    file, entry = find_dataset(name, dataset_dir)
    if entry and not entry.get("ranking"):
        raise ConchError(f"dataset '{name}' is not a preference dataset: its dataset_info.json entry needs "
                         '"ranking": true and chosen/rejected columns.')
    rows = read_json(file)
    if not isinstance(rows, list) or not rows:
        raise ConchError(f"{file} must hold a non-empty JSON list of preference records.")
    first = rows[0] if isinstance(rows[0], dict) else {}
    cols = {"prompt": "prompt" if "prompt" in first else "instruction", "query": "input", "chosen": "chosen",
            "rejected": "rejected", "system": "system", **entry.get("columns", {})}
    pairs = []
    for i, row in enumerate(rows[:max_samples] if max_samples else rows):
        prompt = field_value(row, cols["prompt"], i, file, required=True)
        query = field_value(row, cols["query"], i, file, required=False)
        chosen = field_value(row, cols["chosen"], i, file, required=True)
        rejected = field_value(row, cols["rejected"], i, file, required=True)
        system = field_value(row, cols["system"], i, file, required=False)
        if chosen.strip() == rejected.strip():
            raise ConchError(f"{file} record {i}: 'chosen' and 'rejected' are the same text; a preference "
                             "needs two different answers.")
        user = f"{prompt}\n{query}" if query.strip() else prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        pairs.append(Pair(messages, chosen, rejected))
    return pairs


# ---------------------------------------------------------------------------------------------
# rendering and masking


def _turn_end(tokenizer) -> str:
    """What the template writes after an assistant's text, up to the end token (e.g. ``<|im_end|>``)."""
    sentinel = "\x00ANSWER\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}], tokenize=False)
    after = text.split(sentinel, 1)[1]
    eos = tokenizer.eos_token or ""
    return after[: after.index(eos) + len(eos)] if eos and eos in after else after.rstrip("\n")


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING = ("drop", "keep")


def split_think(output: str) -> tuple[str, str]:
    """(reasoning, answer) of a record's output in LLaMA-Factory's format,
    ``<think>\\n…\\n</think>\\n\\nanswer``; reasoning is "" when there is no think block."""
    if THINK_CLOSE not in output:
        return "", output
    head, answer = output.split(THINK_CLOSE, 1)
    head = head.strip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN):]
    return head.strip(), answer.strip()


def has_reasoning(messages: list[dict]) -> bool:
    """True when the record's answer carries a non-empty think block."""
    return bool(split_think(messages[-1]["content"])[0])


def thinks(tokenizer) -> bool:
    """True for chat templates that know think blocks (DeepSeek-R1's cuts earlier answers at </think>)."""
    return THINK_CLOSE in (getattr(tokenizer, "chat_template", None) or "")


def split_prompt_answer(tokenizer, messages: list[dict], reasoning: str = "drop") -> tuple[str, str]:
    """(prompt, answer) texts: the prompt as inference renders it, the answer as it must follow.

    ``reasoning``: ``drop`` trains every answer after an empty think block, ``keep`` trains the
    record's own ``<think>…</think>`` where it has one (see the module's docstring)."""
    if reasoning not in REASONING:
        raise ConchError(f"reasoning must be drop or keep, got '{reasoning}'.")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    thought, answer = split_think(messages[-1]["content"])
    thought = thought if reasoning == "keep" else ""
    opened = prompt.rstrip(" ").endswith(THINK_OPEN + "\n")
    if opened or thinks(tokenizer) or thought:  # a think block in front (empty without reasoning)
        block = f"{THINK_OPEN}\n{thought}\n{THINK_CLOSE}\n\n" if thought else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
        if opened:  # the generation prompt already opened it (R1's February 2025 template)
            block = block[len(THINK_OPEN) + 1:]
        answer = block + answer
    return prompt, answer + _turn_end(tokenizer)


def encode(tokenizer, messages: list[dict], cutoff_len: int, overlong: str = "error",
           where: str = "record", reasoning: str = "drop") -> Example | None:
    """Tokenize one record: prompt tokens masked, answer tokens trained.

    ``overlong``: ``error`` (default: one sentence naming the record), ``truncate`` (cut the
    end of the answer) or ``drop`` (skip the record; returns None).
    """
    prompt, answer = split_prompt_answer(tokenizer, messages, reasoning)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    total = len(prompt_ids) + len(answer_ids)
    if total > cutoff_len:
        if overlong == "drop":
            return None
        if overlong == "truncate" and len(prompt_ids) >= cutoff_len:
            raise ConchError(f"{where}: its prompt alone is {len(prompt_ids)} tokens, not less than "
                             f"cutoff_len={cutoff_len}, so no answer token would be left; raise cutoff_len, "
                             "shorten its 'instruction'/'input', or set overlong=drop.")
        if overlong != "truncate":
            raise ConchError(f"{where} is {total} tokens, longer than cutoff_len={cutoff_len}; raise cutoff_len, "
                             "shorten its 'output', or set overlong=truncate.")
        answer_ids = answer_ids[: cutoff_len - len(prompt_ids)]
    return Example(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids)


def build_examples(tokenizer, name: str, dataset_dir: str | Path = "data", cutoff_len: int = 1024,
                   max_samples: int | None = None, overlong: str = "error", reasoning: str = "drop") -> list[Example]:
    """Read, validate, render and mask a whole dataset. Nothing is returned if any record is bad."""
    if overlong not in ("error", "truncate", "drop"):
        raise ConchError(f"overlong must be error, truncate or drop, got '{overlong}'.")
    if reasoning not in REASONING:
        raise ConchError(f"reasoning must be drop or keep, got '{reasoning}'.")
    file, _ = find_dataset(name, dataset_dir)
    examples = []
    for i, messages in enumerate(load_records(name, dataset_dir, max_samples)):
        example = encode(tokenizer, messages, cutoff_len, overlong, where=f"{file} record {i}", reasoning=reasoning)
        if example is not None:
            examples.append(example)
    if not examples:
        raise ConchError(f"{file}: no record fits cutoff_len={cutoff_len}; raise cutoff_len.")
    return examples


def length_stats(examples: list[Example]) -> dict:
    """Token-length statistics that guide ``cutoff_len`` and show how much of each sequence is trained."""
    lengths = sorted(len(e) for e in examples)
    trained = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in examples)
    return {
        "records": len(lengths), "min": lengths[0], "mean": round(statistics.mean(lengths), 1),
        "p50": lengths[len(lengths) // 2], "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max": lengths[-1], "tokens": sum(lengths), "trained_tokens": trained,
        "trained_share": round(trained / sum(lengths), 3),
    }


def show_masking(tokenizer, example: Example) -> str:
    """The rendered example with masked (not trained) text in [brackets] and trained text bare."""
    out, run, masked = [], [], None
    for token, label in zip(example.input_ids, example.labels):
        is_masked = label == IGNORE_INDEX
        if masked is not None and is_masked != masked:
            out.append(_span(tokenizer, run, masked))
            run = []
        run.append(token)
        masked = is_masked
    out.append(_span(tokenizer, run, masked))
    return "".join(out)


def _span(tokenizer, ids, masked) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[{text}]" if masked else text


def split_train_val(examples: list, val_size: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle split; ``val_size`` is a fraction (0 disables validation)."""
    import random

    if not 0 <= val_size < 1:
        raise ConchError(f"val_size must be a fraction in [0, 1), got {val_size}.")
    n_val = int(round(len(examples) * val_size))
    if val_size and n_val == 0:
        n_val = 1
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


# ---------------------------------------------------------------------------------------------
# quality checks that no error catches


@dataclass
class Audit:
    """Problems that train without an error but make a model worse; each lists record indices."""

    duplicates: list[tuple[int, int]]  # the same question and the same answer twice
    conflicts: list[tuple[int, int]]  # the same question with two different answers
    short_answers: list[int]  # answers shorter than ``min_answer_chars``
    leaks: list[tuple[int, int]]  # (held-out index, training index): a test question seen in training

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.conflicts or self.short_answers or self.leaks)

    def __str__(self) -> str:
        parts = [f"{name}: {getattr(self, name)}" for name in ("duplicates", "conflicts", "short_answers", "leaks")
                 if getattr(self, name)]
        return "clean: no duplicates, conflicts, short answers or leaks" if self.ok else "; ".join(parts)


def _question(messages: list[dict]) -> tuple:
    """Everything before the answer, with whitespace and case normalised."""
    return tuple((m["role"], " ".join(m["content"].split()).casefold()) for m in messages[:-1])


def audit(records: list[list[dict]], held_out: list[list[dict]] | None = None,
          min_answer_chars: int = 2) -> Audit:
    """Check records (from ``load_records``) for duplicates, conflicting answers to the same
    question, near-empty answers, and held-out questions that also appear in training."""
    first: dict[tuple, int] = {}
    duplicates, conflicts = [], []
    for i, messages in enumerate(records):
        key = _question(messages)
        if key in first:
            j = first[key]
            same = records[j][-1]["content"].strip() == messages[-1]["content"].strip()
            (duplicates if same else conflicts).append((j, i))
        else:
            first[key] = i
    short = [i for i, m in enumerate(records) if len(m[-1]["content"].strip()) < min_answer_chars]
    leaks = [(k, first[_question(m)]) for k, m in enumerate(held_out or []) if _question(m) in first]
    return Audit(duplicates, conflicts, short, leaks)


# ---------------------------------------------------------------------------------------------
# batching: what the Trainer (conch.train) and the answer loss (conch.evaluate) feed the model


def collator(tokenizer, packing: bool):
    """Packing: every batch is one row of concatenated records (position ids restart per record);
    padded: records padded to the longest in the batch (LLaMA-Factory's default)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
