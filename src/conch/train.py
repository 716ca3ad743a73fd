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

``train()`` is composed of public steps, which notebook 04 runs one by one: ``trainkit.training_device``,
``trainkit.load_base_model``, ``add_lora`` (``get_peft_model`` with ``trainkit.lora_config``),
``training_examples`` (with the ``val_size`` validation split), ``trainkit.training_arguments``,
``make_trainer`` (with ``trainkit.progress_callback``, batches from ``data.collator``) and ``fit``.
What DPO shares with it (those steps, the progress plot, the run log, the settings both have) is in
`conch.trainkit`.

In Jupyter the loss plot is redrawn in place while training runs (with progress and ETA);
headless, one line per logging step is printed, fit for ``nohup … > train.log &``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .data import collator
from .trainkit import (SharedConfig, clock, config_yaml, load_base_model, lora_config, memory_report, plot_loss,
                       plot_mode, progress_callback, read_log, resume_point, save_adapter_atomically,
                       training_arguments, training_device)


@dataclass
class TrainConfig(SharedConfig):
    """Every knob the tutorial teaches: SFT's own below, and those DPO has too (`conch.trainkit.SharedConfig`:
    epochs, steps, scheduler, compute type, LoRA rank/alpha/targets, seed, checkpoints, plot).
    Defaults: DeepSeek-R1-Distill-Qwen-1.5B on a 24 GB GPU."""

    # model and data
    base_model: str = "auto"  # auto | demo | hub id | local folder
    dataset: str = "magic_conch"  # a name in dataset_dir/dataset_info.json, or a .json/.jsonl path
    output_dir: str = "outputs/magic_conch_lora"
    cutoff_len: int = 1024  # longest tokenized record (prompt + answer)
    overlong: str = "error"  # records over cutoff_len: error | truncate | drop
    # DeepSeek-R1's think block: drop = every answer after an empty <think></think> (short answers,
    # but reasoning is switched off, maths included); keep = records whose output carries
    # <think>…</think> are trained with that reasoning (see conch.data)
    reasoning: str = "drop"
    val_size: float = 0.1  # share of the training records held out (seeded) for the eval loss and for
    # choosing settings; 0 = none. Never the test set (data/magic_conch_eval.json, notebook 05)
    eval_dataset: str | None = None  # a separate held-out dataset for eval loss (then val_size is not used)
    # optimisation
    learning_rate: float = 2e-4  # LoRA tolerates ~10x the full fine-tuning rate; 1e-3 starts forgetting
    per_device_train_batch_size: int = 8
    packing: bool = True  # padding-free packing: no compute spent on padding
    # LoRA
    lora_dropout: float = 0.05
    # bookkeeping
    logging_steps: int = 5
    eval_steps: int = 20
    save_total_limit: int = 3


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    log_history: list[dict]
    trainable_params: int
    total_params: int
    plot_path: Path | None
    memory: dict = field(default_factory=dict)  # trainkit.memory_report after training: GPU peak, or CPU peak RSS


# ---------------------------------------------------------------------------------------------
# the recipe


def add_lora(model, cfg: TrainConfig):
    """Wrap a model with LoRA adapters on ``cfg.lora_target``; only they are trained."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, cfg))


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
        (output_dir / "train_config.yaml").write_text(config_yaml(cfg))
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
    return TrainResult(output_dir, metrics, history, trainable, total, plot_path, memory)


def train(cfg: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Fine-tune ``cfg.base_model`` with LoRA on ``cfg.dataset``; returns where it all went.

    Made only of public steps, here and in `conch.trainkit`, in this order (notebook 04 runs them one by one):
    ``trainkit.training_device`` → ``trainkit.load_base_model`` → ``add_lora`` (= ``get_peft_model(model,
    trainkit.lora_config(model, cfg))``) → ``training_examples`` → ``trainkit.training_arguments`` →
    ``make_trainer`` (with ``trainkit.progress_callback``) → ``fit``."""
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


