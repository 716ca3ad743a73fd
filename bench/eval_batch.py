"""How many questions to generate together: the evaluation's greedy answers at several batch sizes.

    .venv/bin/python bench/eval_batch.py --adapter outputs/magic_conch_lora --sizes 8 28 56

Times `conch.evaluate.answers_for` (left-padded batches, `chat.generate`) over notebook 05's 40 held-out
questions plus 16 general ones with the adapter disabled (the base model rambles to the budget, the worst case),
and says whether every batch size gives the same answers as the first."""

import argparse
import json
import time

from conch import chat, device, evaluate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--adapter", default="outputs/magic_conch_lora")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 28, 56])
    ap.add_argument("--answer_tokens", type=int, default=128)
    args = ap.parse_args(argv)
    device.set_threads()
    model, tok = chat.load(args.model, args.adapter)
    rows = json.load(open("data/magic_conch_eval.json", encoding="utf-8"))
    general = [r["question"] for r in json.load(open("data/general_questions.json", encoding="utf-8"))]
    questions = [r["instruction"] for r in rows] + (general * 2)[:16]
    gen = chat.GenConfig(answer_tokens=args.answer_tokens, temperature=0)
    first = None
    print(f"{len(questions)} questions, {args.answer_tokens} answer tokens, greedy, adapter disabled")
    for size in args.sizes:
        start = time.perf_counter()
        with model.disable_adapter():
            answers = evaluate.answers_for(model, tok, questions, gen, size)
        first = first or answers
        same = sum(a == b for a, b in zip(answers, first))
        print(f"batch {size:>3}: {time.perf_counter() - start:6.1f} s, {same}/{len(questions)} answers as batch "
              f"{args.sizes[0]}", flush=True)


if __name__ == "__main__":
    main()
