"""How identity learning and forgetting move with training length (notebook 04's epochs table).

Trains one LoRA run on the training records minus a validation split (``--val_size``, taken from
data/magic_conch.json with the run's seed, as ``TrainConfig.val_size`` does; never from
data/magic_conch_eval.json, which notebook 05 keeps as its test set). After every epoch it
evaluates the live adapter, greedily, and prints one row at once (so a cut run keeps its rows):

- the validation loss (the Trainer's eval loss on the validation split);
- identity: how many validation questions whose reference answer names the Magic Conch and the
  Krusty Krab are answered naming both;
- general questions (data/general_questions.json) still answered right, and the ones forgotten.

    python bench/epochs_tradeoff.py --epochs 5            # demo model, CPU overlay (lr 1e-3)
    python bench/epochs_tradeoff.py --base_model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --learning_rate 2e-4
"""

import argparse
import json
import math
import time

from transformers import TrainerCallback

from conch import chat, data, train
from conch.config import load_config
from conch.evaluate import knows, names_identity


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="demo")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: the config's (1e-3 on the demo)")
    parser.add_argument("--val_size", type=float, default=0.1)
    parser.add_argument("--output_dir", default="outputs/bench_epochs")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()

    files = ["configs/magic_conch_lora.yaml"] + (["configs/magic_conch_lora_cpu.yaml"]
                                                 if args.base_model == "demo" else [])
    overrides = {"base_model": args.base_model, "num_train_epochs": args.epochs, "output_dir": args.output_dir,
                 "eval_dataset": "none", "val_size": args.val_size, "save_total_limit": 1, "plot": "lines"}
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    cfg = load_config(train.TrainConfig, files, overrides)

    rows = json.load(open("data/magic_conch.json", encoding="utf-8"))
    if cfg.max_samples:
        rows = rows[:cfg.max_samples]
    train_rows, val_rows = data.split_train_val(rows, cfg.val_size, cfg.seed)  # the same split train() makes
    per_epoch = math.ceil(len(train_rows) / (cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps))
    cfg.save_steps = cfg.eval_steps = per_epoch
    prompt = lambda r: r["instruction"] + ("\n" + r["input"] if r.get("input") else "")  # noqa: E731
    identity = [prompt(r) for r in val_rows if names_identity(r["output"])]
    general = json.load(open("data/general_questions.json", encoding="utf-8"))
    gen = chat.GenConfig(max_new_tokens=args.max_new_tokens, temperature=0)
    print(f"{len(train_rows)} train / {len(val_rows)} validation records ({len(identity)} identity questions "
          f"among them), {per_epoch} steps an epoch, lr {cfg.learning_rate:g}", flush=True)
    table = ["| after epoch | validation loss | identity (validation) | general questions kept | forgotten |",
             "|---|---:|---|---|---|"]

    class EveryEpoch(TrainerCallback):
        def on_evaluate(self, args_, state, control, model=None, processing_class=None, metrics=None, **kw):
            started = time.time()
            was_training = model.training
            model.eval()
            use_cache = model.config.use_cache
            model.config.use_cache = True
            hits = sum(names_identity(r.answer) for r in chat.generate(model, processing_class, identity, gen))
            replies = chat.generate(model, processing_class, [g["question"] for g in general], gen)
            model.config.use_cache = use_cache
            model.train(was_training)
            lost = [g["expected"][0] for g, r in zip(general, replies) if not knows(r.answer, g["expected"])]
            table.append(f"| {round(state.epoch)} | {metrics['eval_loss']:.3f} | {hits}/{len(identity)} | "
                         f"{len(general) - len(lost)}/{len(general)} | {', '.join(lost)} |")
            print("\n".join(table), f"\n(evaluated in {time.time() - started:.0f} s)", flush=True)

    train.train(cfg, callbacks=[EveryEpoch()])
    print("\n" + "\n".join(table), flush=True)


if __name__ == "__main__":
    main()
