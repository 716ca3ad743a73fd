"""Step time and peak memory of one LoRA training step: LM head everywhere vs only at labelled positions.

    .venv/bin/python bench/labelled_loss.py --threads 1 --reps 5          # the demo model, packed batch of 4
    .venv/bin/python bench/labelled_loss.py --packing off --batch 8

A forward + backward of the demo model with LoRA (r=8 on the 7 projections) on real records of
data/magic_conch.json, the two losses interleaved (A B A B …) so that a busy machine slows both
alike; prints the median step time of each and the share of positions that carry a label. Peak
memory is measured in a child process per variant (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default="demo")
parser.add_argument("--batch", type=int, default=4)
parser.add_argument("--packing", default="on", choices=["on", "off"])
parser.add_argument("--reps", type=int, default=5)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast as Trainer's cpu_amp")
parser.add_argument("--only", default=None, choices=["full", "labelled"], help=argparse.SUPPRESS)
args = parser.parse_args()


def setup():
    import torch

    from conch import device as dev
    from conch import hub, train
    from conch.device import Device
    from conch.data import build_examples, collator

    dev.set_threads(args.threads)
    resolved = hub.resolve(args.model)
    model, tok = hub.load_model(resolved.path, Device("cpu", torch.float32, "bench"), for_training=True)
    model.config.use_cache = False
    cfg = train.TrainConfig(lora_dropout=0.0)
    model = train.add_lora(model, cfg)
    examples = build_examples(tok, "magic_conch", "data", 1024)
    collate = collator(tok, packing=args.packing == "on")
    batches = [collate(train.features(examples[i:i + args.batch])) for i in range(0, 10 * args.batch, args.batch)]
    return torch, model, batches


def step(torch, model, batch, kind):
    from conch.loss import labelled_forward

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else torch.autocast("cpu", enabled=False)
    started = time.perf_counter()
    with ctx:
        loss = model(**batch).loss if kind == "full" else labelled_forward(model, batch)[0]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, loss.item()


if args.only:  # child: peak memory of one variant
    torch, model, batches = setup()
    for batch in batches[:3]:
        step(torch, model, batch, args.only)
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    sys.exit(0)

torch, model, batches = setup()
labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
positions = sum(int(b["input_ids"].numel()) for b in batches)
for batch in batches[:2]:  # warm-up
    step(torch, model, batch, "full")
times = {"full": [], "labelled": []}
losses = {"full": [], "labelled": []}
for rep in range(args.reps):
    for batch in batches[2:]:
        for kind in ("full", "labelled") if rep % 2 == 0 else ("labelled", "full"):
            seconds, loss = step(torch, model, batch, kind)
            times[kind].append(seconds)
            losses[kind].append(loss)
peaks = {}
for kind in ("full", "labelled"):
    out = subprocess.run([sys.executable, __file__, "--only", kind, "--model", args.model, "--batch", str(args.batch),
                          "--packing", args.packing, "--threads", str(args.threads), "--dtype", args.dtype],
                         capture_output=True, text=True, check=True)
    peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]
full, lab = statistics.median(times["full"]), statistics.median(times["labelled"])
print(f"model {args.model}, batch {args.batch}, packing {args.packing}, {args.dtype}, {args.threads} thread(s): "
      f"{labelled}/{positions} positions carry a label ({labelled / positions:.0%})")
print(f"  head everywhere: {full:.3f} s a step (median of {len(times['full'])}), peak RSS {peaks['full']:.2f} GiB")
print(f"  labelled only:   {lab:.3f} s a step, peak RSS {peaks['labelled']:.2f} GiB  -> {full / lab:.2f}x")
print(f"  losses equal: max difference {max(abs(a - b) for a, b in zip(losses['full'], losses['labelled'])):.2e}")
