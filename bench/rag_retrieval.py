"""Retrieval cost of `conch.rag` on the shipped knowledge base (no model): what RAG adds to a request.

Reports jieba's dictionary load (once per process), the first index build, the time of one
search (which hashes the files first, to notice edits), the rebuild after an edit, and the hit
rate at k on data/knowledge_eval.json (questions written with the documents) and on
data/knowledge_eval_heldout.json (paraphrases written without their wording), side by side, and
whether a follow-up ("那它多少钱？") finds the promotions with the conversation and with only
the last message. Works on a copy of data/knowledge, which it edits.

Example:
  python bench/rag_retrieval.py --rounds 20
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from conch import paths, rag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knowledge", default=str(paths.repo_root() / "data/knowledge"))
    parser.add_argument("--eval", default=str(paths.repo_root() / "data/knowledge_eval.json"))
    parser.add_argument("--heldout", default=str(paths.repo_root() / "data/knowledge_eval_heldout.json"))
    parser.add_argument("--rounds", type=int, default=20, help="passes over the eval questions")
    args = parser.parse_args()

    started = time.perf_counter()
    rag.tokenize("蟹堡")
    jieba_s = time.perf_counter() - started
    folder = Path(tempfile.mkdtemp()) / "knowledge"
    shutil.copytree(args.knowledge, folder)
    started = time.perf_counter()
    kb = rag.KnowledgeBase(str(folder))
    build_ms = (time.perf_counter() - started) * 1e3
    passages = len(kb.passages)
    cases = rag.load_eval(args.eval)
    times = []
    for _ in range(args.rounds):
        for case in cases:
            started = time.perf_counter()
            kb.search(case["question"], 3)
            times.append((time.perf_counter() - started) * 1e3)
    times.sort()
    promotions = folder / "promotions.md"
    promotions.write_text(promotions.read_text(encoding="utf-8") + "\n## 新优惠\n\n新优惠。\n", encoding="utf-8")
    started = time.perf_counter()
    kb.search("特价")
    rebuild_ms = (time.perf_counter() - started) * 1e3
    shipped = rag.KnowledgeBase(args.knowledge)
    held_out = rag.load_eval(args.heldout)
    rates = {k: (rag.hit_rate(shipped, cases, k)[0], rag.hit_rate(shipped, held_out, k)[0]) for k in (1, 3, 5)}
    conversation = [{"role": "user", "content": "这周的特价是什么？"}, {"role": "assistant", "content": "…"},
                    {"role": "user", "content": "那它多少钱？"}]
    follow_up = {turns: [p.chunk_id for p in rag.with_context(conversation, shipped, turns=turns)[1]]
                 for turns in (1, shipped.cfg.query_turns)}
    shutil.rmtree(folder.parent)
    print(f"jieba dictionary load     {jieba_s * 1e3:8.0f} ms (once per process)")
    print(f"first index build         {build_ms:8.1f} ms ({passages} passages from {len(kb.files)} files)")
    print(f"search p50 / p95          {statistics.median(times):8.2f} / {times[int(0.95 * len(times))]:.2f} ms "
          f"({len(times)} searches, files hashed each time)")
    print(f"search after an edit      {rebuild_ms:8.1f} ms (re-chunk, re-index)")
    print(f"hit rate                  {'original':>10} {'held-out':>10}")
    for k, (original, paraphrased) in rates.items():
        print(f"  @{k:<23} {original:>10.0%} {paraphrased:>10.0%}")
    print(f"  questions                {len(cases):>10} {len(held_out):>10}")
    for turns, found in follow_up.items():
        print(f"follow-up 那它多少钱？, last {turns} user turn(s): {found or 'nothing'}")


if __name__ == "__main__":
    main()
