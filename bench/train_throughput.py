"""LoRA SFT throughput: padded batches (LLaMA-Factory's default) vs padding-free packing (conch's).

Both runs use the project's own training path: `conch.train.add_lora`, `conch.data.collator`,
and transformers' Trainer with the TrainingArguments that `conch.train.train()` builds
(`conch.trainkit.training_arguments`), on the same records, steps and seed. Each run is one
process, so its peak memory is its own. Reported per run: tokens/s (non-padding tokens),
step time, peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU), final loss, and
on GPU the model FLOPs utilisation (MFU).

A run is named by its collator and options joined with "+":
  padded | packed          DataCollatorForSeq2Seq (pad to the longest) | DataCollatorWithFlattening
  bs16, ga1                per-device batch size / gradient accumulation instead of the defaults
  liger                    liger-kernel (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE) via use_liger_kernel
  compile                  torch.compile each decoder layer (dynamic shapes)
  gc                       gradient (activation) checkpointing
  eager | flex             attention implementation instead of sdpa
  nocudnn                  keep SDPA off its cuDNN backend (plans a new graph for every new sequence length)

Examples:
  python bench/train_throughput.py --model demo --runs padded,packed --steps 12 --out outputs/bench/train_cpu.json
  python bench/train_throughput.py --model deepseek-r1-1.5b-arch --length-scale 4 \\
      --runs padded,packed,packed+liger,packed+bs32+ga1 --steps 30 --out outputs/bench/train_gpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import r1_arch  # noqa: E402

# dense bf16 peak of the GPUs people rent for this tutorial (TFLOP/s, no sparsity)
PEAK_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "H800": 989, "A100": 312,
               "A800": 312, "L40S": 362, "RTX 4090": 165, "RTX 3090": 71}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
parser.add_argument("--model", default="demo", help=f"demo | tiny | {r1_arch.NAME} | a local model folder")
parser.add_argument("--runs", default="padded,packed", help="comma-separated runs (see below)")
parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the timing")
parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size (TrainConfig default 8)")
parser.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation (TrainConfig default 2)")
parser.add_argument("--cutoff", type=int, default=1024, help="cutoff_len: records are truncated to it")
parser.add_argument("--dataset", default="magic_conch", help="dataset name in data/dataset_info.json, or a path")
parser.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
parser.add_argument("--data", default="auto", choices=["auto", "real", "synthetic"],
                    help="real: the records tokenized by the model's tokenizer; synthetic: random token ids "
                         f"with the records' lengths (auto: synthetic for {r1_arch.NAME})")
parser.add_argument("--length-tokenizer", default="demo",
                    help="synthetic data: the tokenizer (model folder) that measures the records' lengths")
parser.add_argument("--length-scale", type=float, default=1.0,
                    help="synthetic data: multiply every length (4 makes cutoff 1024 matter)")
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: conch.device.set_threads)")
parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU (default: by name)")
parser.add_argument("--profile", default=None, help="a run to profile with torch.profiler for 2 steps")
parser.add_argument("--out", default=None, help="write the results as JSON here")
parser.add_argument("--plot", default=None, help="write a PNG bar chart of tokens/s and memory here")
parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one variant
args = parser.parse_args()


@dataclass
class Run:
    name: str
    packing: bool
    batch_size: int
    grad_accum: int
    liger: bool = False
    compile: bool = False
    checkpointing: bool = False
    attn: str = "sdpa"
    cudnn_sdpa: bool = True

    @classmethod
    def parse(cls, name: str) -> "Run":
        mode, *options = name.split("+")
        if mode not in ("padded", "packed"):
            raise SystemExit(f"run '{name}' must start with padded or packed")
        run = cls(name, mode == "packed", args.batch_size, args.grad_accum)
        for o in options:
            if o.startswith("bs"):
                run.batch_size = int(o[2:])
            elif o.startswith("ga"):
                run.grad_accum = int(o[2:])
            elif o in ("liger", "compile"):
                setattr(run, o, True)
            elif o == "gc":
                run.checkpointing = True
            elif o == "nocudnn":
                run.cudnn_sdpa = False
            elif o in ("eager", "flex"):
                run.attn = {"eager": "eager", "flex": "flex_attention"}[o]
            else:
                raise SystemExit(f"run '{name}': unknown option '{o}'")
        return run


@dataclass
class Result:
    run: str
    model: str
    device: str
    steps_timed: int
    tokens_per_s: float  # non-padding tokens
    step_s: float  # median optimizer step
    tokens_per_step: float
    padding_share: float  # share of computed positions that were padding
    peak_memory_gb: float
    memory_kind: str
    train_loss: float  # mean over all steps
    final_loss: float  # mean of the last 3 logged steps
    losses: list = field(default_factory=list)
    step_times: list = field(default_factory=list)  # every optimizer step, warm-up included
    mfu: float | None = None
    flops_per_token: float = 0.0
    batch_size: int = 0
    grad_accum: int = 0
    trainable_params: int = 0
    total_params: int = 0
    wall_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# one run (in its own process)


def load_model(device):
    """(model, tokenizer or None) for --model, on `device` in the dtype train() would use."""
    from conch import hub

    if args.model == r1_arch.NAME:
        return r1_arch.build_model(device.device, device.dtype), None
    if args.model == "tiny":
        from conch.tiny import build_tiny_r1

        path = build_tiny_r1(Path(tempfile.mkdtemp()) / "tiny", init_std=0.2)
    else:
        path = hub.resolve(args.model).path
    return hub.load_model(path, device, for_training=True)


def records(tokenizer, vocab_size):
    """The training features: real tokenized records, or random ids with the records' lengths."""
    from conch import data, hub

    synthetic = args.data == "synthetic" or (args.data == "auto" and tokenizer is None)
    if not synthetic:
        examples = data.build_examples(tokenizer, args.dataset, "data", args.cutoff, args.max_samples, "truncate")
        return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    measure = hub.load_tokenizer(hub.resolve(args.length_tokenizer).path if args.length_tokenizer == "demo"
                                 else args.length_tokenizer)
    examples = data.build_examples(measure, args.dataset, "data", 10**6, args.max_samples)
    rng = random.Random(args.seed)
    features = []
    for e in examples:
        prompt = sum(1 for t in e.labels if t == data.IGNORE_INDEX)
        n = min(args.cutoff, round(len(e) * args.length_scale))
        p = min(n - 1, round(prompt * args.length_scale))
        ids = [rng.randrange(vocab_size) for _ in range(n)]
        features.append({"input_ids": ids, "labels": [data.IGNORE_INDEX] * p + ids[p:]})
    return features


def run_one(run: Run) -> Result:
    import torch
    from transformers import Trainer, TrainerCallback, set_seed
    from transformers.trainer_callback import PrinterCallback

    from conch import data, train, trainkit
    from conch.device import pick_device

    device = pick_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not run.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    cuda = device.device == "cuda"
    set_seed(args.seed)
    model, tokenizer = load_model(device)
    if run.attn != "sdpa":
        model.set_attn_implementation(run.attn)
    features = records(tokenizer, model.config.vocab_size)
    if tokenizer is None:  # the collators only need a pad id
        tokenizer = r1_arch.build_tokenizer()

    cfg = train.TrainConfig(base_model=args.model, output_dir=tempfile.mkdtemp(), cutoff_len=args.cutoff,
                            max_steps=args.steps, per_device_train_batch_size=run.batch_size,
                            gradient_accumulation_steps=run.grad_accum, packing=run.packing,
                            gradient_checkpointing=run.checkpointing, logging_steps=1, seed=args.seed, val_size=0)
    compute_type, _ = trainkit.dtype_flags(cfg.compute_type, device)
    model.config.use_cache = False  # as train() does: needed for correct packed attention
    model = train.add_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"{run.name}: {next(model.parameters()).dtype} on {device.device}, attention "
          f"{model.config._attn_implementation}, {len(features)} records, mean length "
          f"{sum(len(f['input_ids']) for f in features) / len(features):.0f}", flush=True)
    if run.compile:  # per decoder layer: one graph (dynamic lengths) reused by all 28 layers
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)

    # count tokens as the collator makes batches; attribute them when the model consumes them
    collate = data.collator(tokenizer, run.packing)
    made, consumed = collections.deque(), {"tokens": 0, "positions": 0}

    def counting_collator(batch):
        out = collate(batch)
        made.append((sum(len(f["input_ids"]) for f in batch), out["input_ids"].numel()))
        return out

    def on_forward(module, a, kw):
        if module.training and made:
            tokens, positions = made.popleft()
            consumed["tokens"] += tokens
            consumed["positions"] += positions

    model.get_base_model().register_forward_pre_hook(on_forward, with_kwargs=True)

    steps = []  # (seconds, tokens, positions) per optimizer step
    profiler = None

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            steps.append((now - self.t, consumed["tokens"], consumed["positions"]))
            consumed.update(tokens=0, positions=0)
            self.t = now
            if profiler is not None:
                profiler.step()

    targs = trainkit.training_arguments(cfg, compute_type, device.device, evaluate=False, save_strategy="no",
                                     use_liger_kernel=run.liger)
    trainer = Trainer(model=model, args=targs, train_dataset=features, data_collator=counting_collator,
                      processing_class=tokenizer, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.profile == run.name:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        profiler = profile(activities=activities,
                           schedule=schedule(wait=args.warmup_steps, warmup=1, active=2, repeat=1))
        profiler.start()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        events = profiler.key_averages()
        print(events.table(sort_by=sort, row_limit=30, max_name_column_width=70), flush=True)
        if cuda:  # GPU-bound or CPU-bound: busy kernel time against the profiled steps' wall time
            busy = sum(e.self_device_time_total for e in events) / 1e6
            print(f"profiled 2 steps: wall {sum(s for s, _, _ in steps[args.warmup_steps + 1:][:2]):.3f} s, "
                  f"GPU kernels busy {busy:.3f} s", flush=True)

    timed = steps[args.warmup_steps:] or steps
    seconds = sum(s for s, _, _ in timed)
    tokens = sum(t for _, t, _ in timed)
    positions = sum(p for _, _, p in timed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if cuda:
        memory, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    else:
        memory, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS"
    fpt = r1_arch.flops_per_token(model)
    mfu = None
    if cuda:
        name = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        mfu = fpt * tokens / seconds / (peak * 1e12) if peak else None
    return Result(run=run.name, model=args.model, device=str(device) if not cuda else torch.cuda.get_device_name(0),
                  steps_timed=len(timed), tokens_per_s=tokens / seconds,
                  step_s=sorted(s for s, _, _ in timed)[len(timed) // 2], tokens_per_step=tokens / len(timed),
                  padding_share=1 - tokens / positions, peak_memory_gb=memory, memory_kind=kind,
                  train_loss=sum(losses) / len(losses), final_loss=sum(losses[-3:]) / len(losses[-3:]),
                  losses=losses, step_times=[round(s, 4) for s, _, _ in steps], mfu=mfu, flops_per_token=fpt,
                  batch_size=run.batch_size, grad_accum=run.grad_accum,
                  trainable_params=trainable, total_params=total, wall_s=wall)


if args.child:
    result = run_one(Run.parse(args.child))
    Path(args.out).write_text(json.dumps(asdict(result)))
    sys.exit(0)

# ---------------------------------------------------------------------------------------------
# every run in its own process, then the table

runs = [Run.parse(r) for r in args.runs.split(",")]  # fail early on a bad name
results, failures = [], {}
for run in runs:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        child_out = f.name
    argv = [a for a in sys.argv[1:]]
    for flag in ("--out", "--plot", "--runs"):  # the child writes only its own result
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith(("--out=", "--plot=", "--runs="))]
    print(f"== {run.name}", flush=True)
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", run.name, "--out", child_out],
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        failures[run.name] = f"exit code {proc.returncode} (see its output above)"
        continue
    results.append(json.loads(Path(child_out).read_text()))
    os.unlink(child_out)

base = next((r for r in results if r["run"] == "padded"), None)
header = f"{'run':<24} {'tokens/s':>9} {'vs padded':>9} {'step s':>7} {'tok/step':>8} {'pad %':>6} " \
         f"{'peak GB':>8} {'loss':>7} {'final':>7} {'MFU':>6}"
print(f"\nmodel {args.model}, {results[0]['device'] if results else '?'}, steps {args.steps} "
      f"(timed after {args.warmup_steps}), seed {args.seed}, cutoff {args.cutoff}")
print(header + "\n" + "-" * len(header))
for r in results:
    r["speedup_vs_padded"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
    speedup = f"{r['speedup_vs_padded']:>8.2f}x" if base else f"{'-':>9}"
    print(f"{r['run']:<24} {r['tokens_per_s']:>9,.0f} {speedup} {r['step_s']:>7.3f} "
          f"{r['tokens_per_step']:>8,.0f} {100 * r['padding_share']:>5.1f}% {r['peak_memory_gb']:>8.2f} "
          f"{r['train_loss']:>7.4f} {r['final_loss']:>7.4f} "
          + (f"{100 * r['mfu']:>5.1f}%" if r["mfu"] is not None else f"{'-':>6}"))
for name, why in failures.items():
    print(f"{name:<24} FAILED: {why}")
if results:
    print(f"memory: {results[0]['memory_kind']}; MFU: {results[0]['flops_per_token'] / 1e9:.3f} GFLOP/token "
          "(4 x non-embedding+lm_head params) against the GPU's dense bf16 peak")

report = {"model": args.model, "settings": {k: v for k, v in vars(args).items() if k != "child"},
          "results": results, "failures": failures}
if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
if args.plot and results:
    from plot import plot_train

    plot_train(results, f"LoRA SFT, {args.model}, {results[0]['device']}", args.plot)
sys.exit(1 if failures else 0)
