"""Stage 3: LoRA supervised fine-tuning with peft and transformers' Trainer.

``train(TrainConfig)`` supports: any causal LM with a chat template (DeepSeek-R1-Distill-Qwen,
the demo SmolLM2, Qwen, Llama…); alpaca/sharegpt data through `conch.data`; bf16/fp16/fp32;
padding-free packing (``DataCollatorWithFlattening``) or padded batches; gradient
accumulation and checkpointing; validation loss; checkpoints every ``save_steps`` and
``resume_from_checkpoint`` (``auto`` = the last complete one); several GPUs through
``accelerate launch`` unchanged. It writes, like LLaMA-Factory::

    output_dir/
      adapter_model.safetensors, adapter_config.json, tokenizer files   the LoRA adapter
      checkpoint-N/   resumable states: adapter_model.safetensors (the lora_A and lora_B matrices),
                      adapter_config.json, optimizer.pt (AdamW moments), scheduler.pt,
                      trainer_state.json (step, epoch, log history), rng_state.pth, training_args.bin
      trainer_log.jsonl   one JSON line per logging/eval step
      loss.png            train and eval loss
      train_config.yaml   the exact settings of this run
      train_results.json  final metrics, trainable parameters, time, peak memory

``train()`` is composed of public steps, which notebook 04 runs one by one: ``training_device``,
``load_base_model``, ``add_lora`` (``get_peft_model`` with ``lora_config``), ``training_examples``
(with the ``val_size`` validation split), ``training_arguments``, ``make_trainer`` (with
``progress_callback``) and ``fit``.

In Jupyter the loss plot is redrawn in place while training runs (with progress and ETA);
headless, one line per logging step is printed, fit for ``nohup … > train.log &``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConchError
from .paths import staged

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    """Every knob the tutorial teaches. Defaults: DeepSeek-R1-Distill-Qwen-1.5B on a 24 GB GPU."""

    # model and data
    base_model: str = "auto"  # auto | demo | hub id | local folder
    dataset: str = "magic_conch"  # a name in dataset_dir/dataset_info.json, or a .json/.jsonl path
    dataset_dir: str = "data"
    output_dir: str = "outputs/magic_conch_lora"
    cutoff_len: int = 1024  # longest tokenized record (prompt + answer)
    overlong: str = "error"  # records over cutoff_len: error | truncate | drop
    # DeepSeek-R1's think block: drop = every answer after an empty <think></think> (short answers,
    # but reasoning is switched off, maths included); keep = records whose output carries
    # <think>…</think> are trained with that reasoning (see conch.data)
    reasoning: str = "drop"
    max_samples: int | None = None  # use only the first N records (quick experiments)
    val_size: float = 0.1  # share of the training records held out (seeded) for the eval loss and for
    # choosing settings; 0 = none. Never the test set (data/magic_conch_eval.json, notebook 05)
    eval_dataset: str | None = None  # a separate held-out dataset for eval loss (then val_size is not used)
    # optimisation
    learning_rate: float = 2e-4  # LoRA tolerates ~10x the full fine-tuning rate; 1e-3 starts forgetting
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 2  # effective batch = batch size x accumulation x GPUs
    max_grad_norm: float = 1.0  # gradient clipping
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant | constant_with_warmup
    warmup: float = 0.1  # < 1: share of all steps; >= 1: number of steps
    weight_decay: float = 0.0
    compute_type: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on modern GPUs and CPUs with native bf16)
    packing: bool = True  # padding-free packing: no compute spent on padding
    gradient_checkpointing: bool = False  # trade ~30% speed for much less activation memory
    # LoRA
    lora_rank: int = 8
    lora_alpha: int = 16  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    lora_target: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # bookkeeping
    seed: int = 42
    logging_steps: int = 5
    eval_steps: int = 20
    save_steps: int = 50
    save_total_limit: int = 3
    resume_from_checkpoint: str | None = None  # None | auto | a checkpoint folder
    plot: str = "auto"  # auto (live in Jupyter) | live | lines | off


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    log_history: list[dict]
    trainable_params: int
    total_params: int
    plot_path: Path | None


# ---------------------------------------------------------------------------------------------
# progress: trainer_log.jsonl, printed lines, the live plot


def in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython().__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def plot_loss(history: list[dict], path: str | Path | None = None, title: str = "", ax=None):
    """Train and eval loss against steps from a log history; saves a PNG when ``path`` is given."""
    import matplotlib

    if path is not None and ax is None and not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["current_steps"], h["loss"]) for h in history if h.get("loss") is not None]
    evals = [(h["current_steps"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.clear()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", alpha=0.85)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(loc="upper right")
    fig = fig or ax.figure
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def read_log(output_dir: str | Path) -> list[dict]:
    """The entries of ``trainer_log.jsonl`` (what the live plot draws)."""
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_callback(output_dir: Path, mode: str, plot=None, keys: tuple[str, ...] = ()):
    """``plot(history, title, fig)`` draws the live figure (default: the loss); ``keys`` are extra
    logged values kept in trainer_log.jsonl and printed (DPO's rewards/accuracies, …)."""
    from transformers import TrainerCallback

    plot = plot or (lambda history, title, fig: plot_loss(
        history, title=title, ax=fig.axes[0] if fig.axes else fig.add_subplot()))

    class Progress(TrainerCallback):
        """Writes trainer_log.jsonl and shows progress: a live plot in Jupyter, lines otherwise."""

        def __init__(self):
            self.started = self.threads_checked = time.time()
            self.history: list[dict] = []
            self.handle = self.fig = None
            self.last_logs: dict = {}

        def on_train_begin(self, args, state, control, **kw):
            self.started = time.time()
            self.first_step = state.global_step  # > 0 when resuming
            log = output_dir / "trainer_log.jsonl"
            if state.is_world_process_zero:
                # on resume keep the entries up to the checkpoint, drop the ones after it
                self.history = [h for h in read_log(output_dir) if h["current_steps"] <= state.global_step]
                log.write_text("".join(json.dumps(h) + "\n" for h in self.history))

        def on_step_end(self, args, state, control, **kw):
            # on a CPU, every half minute: the threads follow the free cores (another job may have finished)
            if args.device.type != "cpu" or time.time() - self.threads_checked < 30:
                return
            import torch

            from .device import follow_free_cores

            self.threads_checked, now = time.time(), torch.get_num_threads()
            threads = follow_free_cores(now)
            if threads != now:
                torch.set_num_threads(threads)
                if state.is_world_process_zero:
                    print(f"step {state.global_step}: {threads} CPU threads now (were {now}: the free cores changed)",
                          flush=True)

        def on_log(self, args, state, control, logs=None, **kw):
            self.last_logs = dict(logs or {})
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.time() - self.started
            done = max(state.global_step - self.first_step, 1)
            remaining = elapsed / done * (state.max_steps - state.global_step)
            entry = {"current_steps": state.global_step, "total_steps": state.max_steps,
                     "loss": logs.get("loss"), "eval_loss": logs.get("eval_loss"),
                     "lr": logs.get("learning_rate"), "epoch": round(state.epoch or 0, 2),
                     "grad_norm": logs.get("grad_norm"),
                     "percentage": round(100 * state.global_step / max(state.max_steps, 1), 1),
                     "elapsed_time": clock(elapsed), "remaining_time": clock(remaining),
                     **{k: logs[k] for k in keys if logs.get(k) is not None}}
            if entry["loss"] is None and entry["eval_loss"] is None:
                return  # the final train summary: reported by train() itself
            self.history.append(entry)
            with open(output_dir / "trainer_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            filled = int(20 * state.global_step / max(state.max_steps, 1))
            status = (f"{'█' * filled}{'░' * (20 - filled)} step {state.global_step}/{state.max_steps} "
                      f"({entry['percentage']:.0f}%) · {entry['elapsed_time']} elapsed · ETA {entry['remaining_time']}")
            if mode == "live":
                self._draw(status)
            elif mode == "lines":
                parts = [f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "",
                         f"eval_loss {entry['eval_loss']:.4f}" if entry["eval_loss"] is not None else "",
                         f"lr {entry['lr']:.2e}" if entry["lr"] is not None else "",
                         f"epoch {entry['epoch']:.2f}"] + [f"{k} {entry[k]:.3f}" for k in keys if k in entry]
                print(f"{status} | " + "  ".join(p for p in parts if p), flush=True)

        def _draw(self, status):
            import matplotlib.pyplot as plt
            from IPython.display import display

            if self.fig is None:
                self.fig = plt.figure(figsize=(10, 3.6) if keys else (7, 3.6))
                plt.close(self.fig)  # shown through the display handle only
                self.handle = display(self.fig, display_id=True)
            plot(self.history, status, self.fig)
            self.handle.update(self.fig)

    return Progress()


# ---------------------------------------------------------------------------------------------
# memory


def memory_report(device: str) -> dict:
    """GPU: allocated now and peak (GB); CPU: the process's peak resident memory (GB)."""
    if device == "cuda":
        import torch

        return {"gpu_allocated_gb": round(torch.cuda.memory_allocated() / 2**30, 2),
                "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "gpu_total_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return {"cpu_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


# ---------------------------------------------------------------------------------------------
# the recipe


def dtype_flags(compute_type: str, device):
    import torch

    if compute_type == "auto":
        compute_type = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(device.dtype, "fp32")
    if compute_type not in ("bf16", "fp16", "fp32"):
        raise ConchError(f"compute_type must be auto, bf16, fp16 or fp32, got '{compute_type}'.")
    if compute_type == "fp16" and device.device == "cpu":
        raise ConchError("compute_type=fp16 needs a GPU; on a CPU use compute_type=auto (bf16 where the CPU has it, "
                         "else fp32).")
    if compute_type == "bf16" and device.device == "cpu" and device.dtype != torch.bfloat16:
        raise ConchError("compute_type=bf16 needs a GPU or a CPU with native bfloat16 (AVX512-BF16 or AMX), which this "
                         "one lacks; use compute_type=auto or fp32 (CONCH_CPU_DTYPE=bf16 forces the slow emulation).")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_type]
    return compute_type, dtype


def plot_mode(plot: str) -> str:
    """``plot`` checked, and ``auto`` resolved: live in Jupyter, lines elsewhere."""
    if plot not in ("auto", "live", "lines", "off"):
        raise ConchError(f"plot must be auto, live, lines or off, got '{plot}'.")
    return plot if plot != "auto" else ("live" if in_notebook() else "lines")


def resume_point(setting: str | None, output_dir: Path) -> Path | str | None:
    """The checkpoint to resume from: None, ``auto`` (the newest complete one) or a folder, checked."""
    resume = last_checkpoint(output_dir) if setting == "auto" else setting
    if resume is not None and not (Path(resume) / "trainer_state.json").exists():
        raise ConchError(f"resume_from_checkpoint={resume} is not a complete checkpoint folder; "
                         "use auto or a checkpoint-N folder under output_dir.")
    return resume


def training_device(base_model: str, compute_type: str):
    """(the resolved base model, the device with the training dtype, the compute type's name)."""
    from . import hub
    from .device import pick_device

    resolved = hub.resolve(base_model)
    device = pick_device()
    compute_type, dtype = dtype_flags(compute_type, device)
    return resolved, hub.Device(device.device, dtype, device.why), compute_type


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint (one whose trainer_state.json was written)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in folders if (p / "trainer_state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def lora_config(model, cfg: TrainConfig):
    """The peft LoraConfig for ``cfg`` (its lora_* fields), checked against the model's module names."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target if t not in names]
    if missing:
        raise ConchError(f"lora_target {missing} are not module names of this model; "
                         f"choose among {', '.join(sorted(n for n in names if n.endswith('proj')))}.")
    return LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target))


def add_lora(model, cfg: TrainConfig):
    """Wrap a model with LoRA adapters on ``cfg.lora_target``; only they are trained."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg))


def collator(tokenizer, packing: bool):
    """Packing: every batch is one row of concatenated records (position ids restart per record);
    padded: records padded to the longest in the batch (LLaMA-Factory's default)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from .data import IGNORE_INDEX

    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def training_arguments(cfg: TrainConfig, compute_type: str, device: str, evaluate: bool, args_class=None,
                       **overrides):
    """The Trainer settings `train()` uses for ``cfg`` (bench/ and `conch.dpo` reuse them, the latter
    with ``args_class=trl.DPOConfig``); ``overrides`` win."""
    from transformers import TrainingArguments

    args_class = args_class or TrainingArguments

    values = dict(
        output_dir=str(cfg.output_dir), learning_rate=cfg.learning_rate, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
        bf16=compute_type == "bf16", fp16=compute_type == "fp16", use_cpu=device == "cpu",
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps" if evaluate else "no", eval_steps=getattr(cfg, "eval_steps", None),
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, report_to="none", remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, ddp_find_unused_parameters=False, prediction_loss_only=True,
    )
    if "activation_checkpointing" not in TrainingArguments.__dataclass_fields__:  # transformers before the rename
        values["gradient_checkpointing"] = values.pop("activation_checkpointing")
        values["gradient_checkpointing_kwargs"] = values.pop("activation_checkpointing_kwargs")
    return args_class(**{**values, **overrides})


def load_base_model(resolved, device):
    """The base model and its tokenizer, ready for training (``use_cache`` off)."""
    from . import hub

    model, tokenizer = hub.load_model(resolved.path, device, for_training=True)
    model.config.use_cache = False  # required for correct packed attention, useless in training
    return model, tokenizer


def training_examples(tokenizer, cfg: TrainConfig) -> tuple[list, list, list]:
    """(all examples, training examples, validation examples), every record read and checked first.

    The validation examples are ``cfg.eval_dataset`` when set, otherwise a seeded ``cfg.val_size``
    share of the training records (``data.split_train_val``)."""
    from . import data

    examples = data.build_examples(tokenizer, cfg.dataset, cfg.dataset_dir, cfg.cutoff_len, cfg.max_samples,
                                   cfg.overlong, cfg.reasoning)
    if cfg.eval_dataset:
        val_ex = data.build_examples(tokenizer, cfg.eval_dataset, cfg.dataset_dir, cfg.cutoff_len, None, "truncate",
                                     cfg.reasoning)
        return examples, examples, val_ex
    return (examples, *data.split_train_val(examples, cfg.val_size, cfg.seed))


def features(examples: list) -> list[dict]:
    """Examples as the rows the Trainer and the collator take: input_ids and labels."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def labelled_trainer_class():
    """transformers' Trainer whose loss runs the LM head only where a label is set (``conch.loss``):
    the prompt's positions cost nothing at the head and their float32 logits are never made."""
    from transformers import Trainer

    from .loss import labelled_forward

    class LabelledTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = labelled_forward(model, inputs, num_items_in_batch)
            # as Trainer.compute_loss: a loss divided by the tokens of the whole accumulated batch is already
            # scaled for gradient accumulation; across devices that count is global, and DDP averages the
            # gradients, so each process's loss is multiplied by the number of processes
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

    return LabelledTrainer


def make_trainer(model, tokenizer, args, train_ex: list, val_ex: list, packing: bool, callbacks: list):
    """transformers' Trainer (the ``labelled_trainer_class`` kind) over the examples, with our
    callbacks instead of its printed logs."""
    from transformers.trainer_callback import PrinterCallback

    trainer = labelled_trainer_class()(model=model, args=args, train_dataset=features(train_ex),
                      eval_dataset=features(val_ex) if val_ex else None,
                      data_collator=collator(tokenizer, packing), processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # the Progress callback reports instead
    return trainer


def describe(cfg: TrainConfig, model_name: str, device, model, examples: list, train_ex: list, val_ex: list) -> str:
    """The few lines printed before training: model, LoRA share, data."""
    from . import data

    trainable, total = model.get_nb_trainable_parameters()
    stats = data.length_stats(examples)
    return (f"model: {model_name} on {device}\n"
            f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha} on {','.join(cfg.lora_target)}: "
            f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)\n"
            f"data: {len(train_ex)} train / {len(val_ex)} eval records, {stats['tokens']:,} tokens "
            f"(mean {stats['mean']}, max {stats['max']}), packing={'on' if cfg.packing else 'off'}, "
            f"reasoning={cfg.reasoning}")


def fit(trainer, cfg: TrainConfig, resolved, resume=None) -> TrainResult:
    """Run the Trainer, then write what LLaMA-Factory writes: the adapter, loss.png,
    train_config.yaml and train_results.json (final metrics, trainable parameters, time, memory)."""
    output_dir = Path(cfg.output_dir)
    device = "cuda" if trainer.args.device.type == "cuda" else "cpu"
    trainable, total = trainer.model.get_nb_trainable_parameters()
    main = trainer.is_world_process_zero()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.yaml").write_text(config_yaml(dataclasses.asdict(cfg)))
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - started
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        # trainer.state.log_history is the same on every process (the Progress history is rank 0's
        # only): with several GPUs all ranks must agree on whether to run this collective evaluate()
        last = next((h for h in reversed(trainer.state.log_history) if h.get("eval_loss") is not None), None)
        if last is None or last.get("step") != trainer.state.global_step:
            last = {"eval_loss": trainer.evaluate()["eval_loss"]}
        metrics["eval_loss"] = last["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(last["eval_loss"], 50))
    memory = memory_report(device)

    plot_path = None
    if main:
        save_adapter_atomically(trainer, output_dir)
        history = read_log(output_dir)
        if cfg.plot != "off":
            plot_path = output_dir / "loss.png"
            fig = plot_loss(history, plot_path, title=f"{resolved.name}: LoRA r={cfg.lora_rank}, "
                                                      f"lr={cfg.learning_rate:g}")
            import matplotlib.pyplot as plt

            plt.close(fig)
        summary = {**metrics, "train_seconds": round(seconds, 1), "trainable_params": trainable,
                   "total_params": total, "base_model": resolved.name, "base_model_path": str(resolved.path),
                   "memory": memory}
        (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2))
        print(f"done in {clock(seconds)}: train loss {metrics.get('train_loss', float('nan')):.4f}"
              + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
              + f"\nmemory: {memory}\nadapter saved to {output_dir}", flush=True)
    else:
        history = []
    return TrainResult(output_dir, metrics, history, trainable, total, plot_path)


def train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Fine-tune ``cfg.base_model`` with LoRA on ``cfg.dataset``; returns where it all went.

    Made only of the public steps above, in this order (notebook 04 runs them one by one):
    ``training_device`` → ``load_base_model`` → ``add_lora`` (= ``get_peft_model(model,
    lora_config(model, cfg))``) → ``training_examples`` → ``training_arguments`` →
    ``make_trainer`` (with ``progress_callback``) → ``fit``."""
    from transformers import set_seed

    mode = plot_mode(cfg.plot)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    resume = resume_point(cfg.resume_from_checkpoint, output_dir)

    resolved, device, compute_type = training_device(cfg.base_model, cfg.compute_type)
    mem_before = memory_report(device.device)
    model, tokenizer = load_base_model(resolved, device)
    model = add_lora(model, cfg)
    examples, train_ex, val_ex = training_examples(tokenizer, cfg)  # a bad record stops the run here

    output_dir.mkdir(parents=True, exist_ok=True)
    args = training_arguments(cfg, compute_type, device.device, evaluate=bool(val_ex))
    trainer = make_trainer(model, tokenizer, args, train_ex, val_ex, cfg.packing,
                           [progress_callback(output_dir, mode)] + list(callbacks or []))
    if trainer.is_world_process_zero():
        print(describe(cfg, resolved.name, device, model, examples, train_ex, val_ex)
              + f"\nmemory before training: {mem_before}" + (f"\nresuming from {resume}" if resume else ""),
              flush=True)
    return fit(trainer, cfg, resolved, resume)


def save_adapter_atomically(trainer, output_dir: Path) -> None:
    """Write the adapter to a temporary folder, then move its files into output_dir."""
    with staged(output_dir, overlay=True) as tmp:
        trainer.save_model(str(tmp))


def config_yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
