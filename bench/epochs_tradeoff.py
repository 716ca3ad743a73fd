"""How identity learning and forgetting move with training length (notebook 04's table).

Trains one LoRA run, saving a checkpoint after every epoch, then asks every checkpoint the
held-out identity questions and the general questions, greedily:

    python bench/epochs_tradeoff.py --epochs 5 --learning_rate 1e-3        # demo model, CPU: ~15 min
    python bench/epochs_tradeoff.py --base_model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --learning_rate 2e-4

Prints one row per epoch: identity hits, general questions kept, and the ones it forgot.
"""

import argparse
import json
import math
from pathlib import Path

from conch import chat, hub, train
from conch.config import load_config
from conch.evaluate import knows, names_identity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="demo")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--output_dir", default="outputs/bench_epochs")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()

    files = ["configs/magic_conch_lora.yaml"] + (["configs/magic_conch_lora_cpu.yaml"] if args.base_model == "demo" else [])
    cfg = load_config(train.TrainConfig, files, {"base_model": args.base_model, "num_train_epochs": args.epochs,
                                                 "learning_rate": args.learning_rate, "output_dir": args.output_dir,
                                                 "eval_dataset": "none", "val_size": 0, "save_total_limit": args.epochs + 1,
                                                 "plot": "lines"})
    records = json.load(open("data/magic_conch.json", encoding="utf-8"))
    cfg.save_steps = math.ceil(len(records) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps))
    train.train(cfg)

    identity = [r["instruction"] for r in json.load(open("data/magic_conch_eval.json", encoding="utf-8"))
                if r["category"] == "identity"]
    general = json.load(open("data/general_questions.json", encoding="utf-8"))
    from peft import PeftModel

    base, tokenizer = hub.load_model(hub.resolve(args.base_model).path)
    gen = chat.GenConfig(max_new_tokens=args.max_new_tokens, temperature=0)
    print("\n| after epoch | identity answers | general questions kept | forgotten |\n|---|---|---|---|")
    checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for epoch, checkpoint in enumerate(checkpoints, 1):
        model = PeftModel.from_pretrained(base, checkpoint).eval()
        hits = sum(names_identity(r.answer) for r in chat.generate(model, tokenizer, identity, gen))
        replies = chat.generate(model, tokenizer, [g["question"] for g in general], gen)
        lost = [g["expected"][0] for g, r in zip(general, replies) if not knows(r.answer, g["expected"])]
        print(f"| {epoch} | {hits}/{len(identity)} | {len(general) - len(lost)}/{len(general)} | {', '.join(lost)} |")
        base = model.unload()


if __name__ == "__main__":
    main()
