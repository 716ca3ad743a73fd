"""What both trainers (`conch.train`'s SFT and `conch.dpo`'s DPO) share: the settings they have in common
(`SharedConfig`), the device and dtype, the base model, the LoRA config, the Trainer settings, the progress
callback and its loss plot, the run log (``trainer_log.jsonl``), the clock, the memory report, the atomic adapter
save and the config snapshot (``train_config.yaml`` / ``dpo_config.yaml``)."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import as_ordered_dict
from .device import CoreWatch
from .errors import ConchError
from .paths import staged

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SharedConfig:
    """The fields `conch.train.TrainConfig` and `conch.dpo.DpoConfig` both have, with the same defaults; each config
    adds its own (those whose defaults differ too: learning rate, batch size, LoRA dropout, logging steps, …)."""

    # data
    dataset_dir: str = "data"
    max_samples: int | None = None  # use only the first N records (quick experiments)
    # optimisation
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    gradient_accumulation_steps: int = 2  # effective batch = batch size x accumulation x GPUs
    max_grad_norm: float = 1.0  # gradient clipping
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant | constant_with_warmup
    warmup: float = 0.1  # < 1: share of all steps; >= 1: number of steps
    weight_decay: float = 0.0
    compute_type: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 on modern GPUs and CPUs with native bf16)
    gradient_checkpointing: bool = False  # trade ~30% speed for much less activation memory
    # LoRA
    lora_rank: int = 8
    lora_alpha: int = 16  # the update is scaled by lora_alpha / lora_rank
    lora_target: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # bookkeeping
    seed: int = 42
    save_steps: int = 50
    resume_from_checkpoint: str | None = None  # None | auto | a checkpoint folder
    plot: str = "auto"  # auto (live in Jupyter) | live | lines | off


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
            self.started = time.time()
            self.cores = CoreWatch()
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
            # on a CPU the threads follow the free cores (another job may have finished, or started)
            if args.device.type != "cpu":
                return
            import torch

            now = torch.get_num_threads()
            threads = self.cores.threads(now)
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
# the run: device, base model, LoRA, Trainer settings, checkpoints


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
    from .device import Device, pick_device

    resolved = hub.resolve(base_model)
    device = pick_device()
    compute_type, dtype = dtype_flags(compute_type, device)
    return resolved, Device(device.device, dtype, device.why), compute_type


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* checkpoint (one whose trainer_state.json was written)."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [p for p in folders if (p / "trainer_state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def load_base_model(resolved, device):
    """The base model and its tokenizer, ready for training (``use_cache`` off)."""
    from . import hub

    model, tokenizer = hub.load_model(resolved.path, device, for_training=True)
    model.config.use_cache = False  # required for correct packed attention, useless in training
    return model, tokenizer


def lora_config(model, cfg):
    """The peft LoraConfig for ``cfg``, a `conch.train.TrainConfig` or a `conch.dpo.DpoConfig` (its lora_* fields:
    rank, alpha and targets from `SharedConfig`, the dropout each config's own), checked against the model's
    module names."""
    from peft import LoraConfig

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in cfg.lora_target if t not in names]
    if missing:
        raise ConchError(f"lora_target {missing} are not module names of this model; "
                         f"choose among {', '.join(sorted(n for n in names if n.endswith('proj')))}.")
    return LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target))


def training_arguments(cfg, compute_type: str, device: str, evaluate: bool, args_class=None,
                       **overrides):
    """The Trainer settings for ``cfg``, a `conch.train.TrainConfig` or a `conch.dpo.DpoConfig` (the latter with
    ``args_class=trl.DPOConfig``; bench/ reuses them too); ``overrides`` win."""
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


# ---------------------------------------------------------------------------------------------
# what a finished run writes


def save_adapter_atomically(trainer, output_dir: Path) -> None:
    """Write the adapter to a temporary folder, then move its files into output_dir."""
    with staged(output_dir, overlay=True) as tmp:
        trainer.save_model(str(tmp))


def config_yaml(cfg) -> str:
    """A stage's config as the YAML saved beside its output (train_config.yaml, dpo_config.yaml): its own fields
    first, as ``--help`` lists them (``config.as_ordered_dict``), loadable again with ``--config``."""
    import yaml

    return yaml.safe_dump(as_ordered_dict(cfg), sort_keys=False, allow_unicode=True)
