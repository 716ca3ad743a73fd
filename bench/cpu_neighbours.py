"""One LoRA training step of the demo model beside another busy process: why `make test`'s test modules wait while
a notebook cell trains (tests/lanes.py) instead of running at a lower priority.

    .venv/bin/python bench/cpu_neighbours.py             # every neighbour below, 4 steps each (~5 min on 2 cores)
    .venv/bin/python bench/cpu_neighbours.py --steps 6 --only alone,busy

The step: the demo model in float32 with LoRA r=8 on its 7 projections, 4 random sequences of 256 tokens, forward,
backward, AdamW (the median of ``--steps`` steps after one warm-up). The neighbour is a Python busy loop (one core):
at nice 0, at nice 10 / 19 in this session, in a session of its own (`setsid`, as Jupyter starts its kernels) at nice
19, and there with its session's autogroup at nice 19 (Linux's autogroups: a process's nice counts only against the
processes of its own session; /proc/<pid>/autogroup sets the session's). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

RUNS = {  # name: (threads of the step, how the neighbour starts, its autogroup's nice, what it shows)
    "alone": (2, None, None, "no neighbour, 2 threads"),
    "busy, 1 thread": (1, [], None, "beside a busy process (nice 0), 1 thread: conch's thread check"),
    "busy": (2, [], None, "beside a busy process (nice 0), 2 threads: oversubscribed"),
    "nice 10": (2, ["nice", "-n", "10"], None, "beside it at nice 10 (same session), 2 threads"),
    "nice 19": (2, ["nice", "-n", "19"], None, "beside it at nice 19 (same session), 2 threads"),
    "setsid nice 19": (2, ["setsid", "nice", "-n", "19"], None,
                       "beside it at nice 19 in its own session (autogroup at 0), 2 threads"),
    "setsid autogroup 19": (2, ["setsid", "nice", "-n", "19"], 19,
                            "the same with its autogroup at nice 19, 2 threads"),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--only", default=None, help="comma-separated names of: " + ", ".join(RUNS))
parser.add_argument("--step", type=int, default=None, help=argparse.SUPPRESS)  # the child: threads of one run
args = parser.parse_args()


def step_child(threads: int, steps: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conch import hub

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hub.ensure_demo(), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"]))
    ids = torch.randint(0, model.config.vocab_size, (4, 256))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def one():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    one()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    print(f"{statistics.median(times):.3f}")


if args.step is not None:
    step_child(args.step, args.steps)
    sys.exit(0)

names = args.only.split(",") if args.only else list(RUNS)
print("| neighbour | step s (median) |\n|---|---:|")
for name in names:
    threads, prefix, autogroup, label = RUNS[name]
    hog = None
    if prefix is not None:
        hog = subprocess.Popen(prefix + [sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        if autogroup is not None:
            with open(f"/proc/{hog.pid}/autogroup", "w") as f:  # setsid and nice exec: the pid is the loop's
                f.write(str(autogroup))
    try:
        out = subprocess.run([sys.executable, __file__, "--step", str(threads), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True, env=dict(os.environ, CONCH_THREADS=""))
        print(f"| {label} | {out.stdout.strip().splitlines()[-1]} |", flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
