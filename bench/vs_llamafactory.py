"""LLaMA-Factory 0.9.5 beside conch: the same data, model and LoRA settings, one run after the other.

    make llamafactory                                    # .venv-lf, once
    .venv/bin/python bench/vs_llamafactory.py            # 2 epochs each (about half an hour on 2 CPU cores)
    .venv/bin/python bench/vs_llamafactory.py --max_steps 24 --runs lf-default conch

Every run is a fresh process: LLaMA-Factory's own CLI (`llamafactory-cli train`) on the YAML `conch.llamafactory`
writes from configs/magic_conch_lora.yaml (+ the CPU overlay where there is no GPU), and `python -m conch train`
with the same configs. Runs:

    lf-default   LF as it ships: gradient checkpointing on (LF's default, even on a CPU)
    lf-no-ckpt   LF with disable_gradient_checkpointing: true (what conch's YAML writes)
    lf-bf16      the same with bf16: true (Trainer's cpu_amp on a CPU); only where the CPU has native bf16
    conch        conch's default (padding-free packing, the LM head at labelled positions)

For each: wall time of the process, the Trainer's train_runtime, peak RSS (GNU time's maximum resident set),
final train loss, and (full runs only) the held-out identity answers of the trained adapter (greedy, 64 tokens,
`evaluate.names_identity`). Threads: CONCH_THREADS / OMP_NUM_THREADS for both (default: the cores of this machine).
Run it on a quiet machine: another process on the cores makes every figure wrong."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conch import llamafactory, train
from conch.config import load_config

REPO = Path(__file__).resolve().parent.parent
RUNS = ("lf-default", "lf-no-ckpt", "lf-bf16", "conch")


def configs() -> list[str]:
    import torch

    files = ["configs/magic_conch_lora.yaml"]
    return files if torch.cuda.is_available() else files + ["configs/magic_conch_lora_cpu.yaml"]


def timed(command: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``command`` under GNU time; its output goes to ``log``."""
    start = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "maxrss_kib=%M", *command], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed (exit {done.returncode}); the end of {log}:\n{text[-3000:]}")
    return wall, int(re.findall(r"maxrss_kib=(\d+)", text)[-1]) / 2**20


def identity_share(base_model: str, adapter: Path) -> str:
    """Held-out identity answers named right: greedy, 64 tokens, the identity rows of magic_conch_eval."""
    from conch import chat, evaluate

    rows = [r for r in json.loads((REPO / "data" / "magic_conch_eval.json").read_text(encoding="utf-8"))
            if r.get("category") == "identity"]
    model, tokenizer = chat.load(base_model, str(adapter))
    replies = chat.generate(model, tokenizer, [r["instruction"] for r in rows],
                            chat.GenConfig(answer_tokens=64, temperature=0))
    hits = sum(evaluate.names_identity(r.answer) for r in replies)
    return f"{hits}/{len(rows)}"


def main(argv=None):
    from conch import device, hub

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    ap.add_argument("--max_steps", type=int, default=-1, help="> 0: that many steps instead of the configs' epochs")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="outputs/vs_llamafactory")
    args = ap.parse_args(argv)
    lf_cli = REPO / ".venv-lf" / "bin" / "llamafactory-cli"
    if any(r.startswith("lf") for r in args.runs) and not lf_cli.exists():
        sys.exit(f"{lf_cli.relative_to(REPO)} is missing: run `make llamafactory` first.")
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"max_steps": args.max_steps} if args.max_steps > 0 else {}
    cfg = load_config(train.TrainConfig, configs(), overrides)
    model_path = str(hub.resolve(cfg.base_model).path)
    env = {**os.environ, "CONCH_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads),
           "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    native_bf16 = device.cpu_has_bf16()
    rows = []
    for run in args.runs:
        run_dir = out / run
        if run == "lf-bf16" and not native_bf16:
            rows.append({"run": run, "skipped": "this CPU has no native bf16 (emulated bf16 is slower than fp32)"})
            continue
        if run == "conch":
            command = [sys.executable, "-m", "conch", "train", *[a for f in configs() for a in ("--config", f)],
                       "--output_dir", str(run_dir), "--plot", "off",
                       *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]]
        else:
            values = llamafactory.llamafactory_config(cfg, model_path=model_path)
            values["output_dir"] = str(run_dir)
            if run == "lf-default":
                values.pop("disable_gradient_checkpointing")
            if run == "lf-bf16":
                values["bf16"] = True
            if args.max_steps > 0:
                values["max_steps"] = args.max_steps
            config = out / f"{run}.yaml"
            config.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
            command = [str(lf_cli), "train", str(config)]
        shutil.rmtree(run_dir, ignore_errors=True)  # both would resume from a checkpoint left there
        print(f"{run}: {' '.join(command)}", flush=True)
        wall, rss = timed(command, {**env, "PYTHONPATH": ""} if run != "conch" else env, out / f"{run}.log")
        results = json.loads((run_dir / "train_results.json").read_text())
        row = {"run": run, "wall_s": round(wall, 1), "train_runtime_s": round(results["train_runtime"], 1),
               "train_loss": round(results["train_loss"], 4), "peak_rss_gib": round(rss, 2),
               "identity": identity_share(model_path, run_dir) if args.max_steps <= 0 else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    conch_row = next((r for r in rows if r["run"] == "conch"), None)
    print("\n| run | train runtime s | wall s | train loss | peak RSS GiB | held-out identity | conch is faster by |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['run']} | skipped: {r['skipped']} | | | | | |")
            continue
        faster = conch_row and r is not conch_row
        ratio = f"{r['train_runtime_s'] / conch_row['train_runtime_s']:.2f}x" if faster else ""
        print(f"| {r['run']} | {r['train_runtime_s']} | {r['wall_s']} | {r['train_loss']} | {r['peak_rss_gib']} | "
              f"{r['identity'] or '–'} | {ratio} |")


if __name__ == "__main__":
    main()
