"""The same LoRA run in LLaMA-Factory, the course's tool: a ``TrainConfig`` as LF's YAML.

The course articles set these values in LLaMA-Factory's web UI (``llamafactory-cli webui``);
``llamafactory_config(cfg)`` writes them as the keys of ``llamafactory-cli train some.yaml`` (LF
0.9.5, its own venv: ``make llamafactory``), one for one with notebook 04's table of UI fields.
LF's output folder is a peft adapter like conch's, so ``conch chat / eval / merge --adapter`` load it.

What LF does differently with the same keys (FIELD_NOTES, measured on the demo): it trains every
assistant turn of a multi-turn record (conch only the last), truncates records over
``cutoff_len`` (conch's ``overlong`` is not mapped), pads batches (conch's ``packing`` is not
mapped: LF's ``neat_packing`` is a different mechanism), and resumes from the newest checkpoint in
``output_dir`` whenever there is one (conch: ``resume_from_checkpoint: auto``).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConchError

# TrainConfig field -> LF key, where only the name differs or nothing at all (notebook 04's table). Fields not
# here are converted below (warmup, compute_type, lora_target, reasoning, gradient_checkpointing, paths) or are
# conch's own (overlong, packing, plot: see the module docstring).
SAME_MEANING = {
    "dataset": "dataset", "cutoff_len": "cutoff_len", "max_samples": "max_samples", "val_size": "val_size",
    "eval_dataset": "eval_dataset", "learning_rate": "learning_rate", "num_train_epochs": "num_train_epochs",
    "max_steps": "max_steps", "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "max_grad_norm": "max_grad_norm",
    "lr_scheduler_type": "lr_scheduler_type", "weight_decay": "weight_decay", "lora_rank": "lora_rank",
    "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "seed": "seed", "logging_steps": "logging_steps",
    "eval_steps": "eval_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
}

# TrainConfig field -> the LF keys it becomes by a conversion in llamafactory_config
CONVERTED = {
    "base_model": ("model_name_or_path", "template"), "dataset_dir": ("dataset_dir",), "output_dir": ("output_dir",),
    "lora_target": ("lora_target",), "warmup": ("warmup_ratio", "warmup_steps"), "compute_type": ("bf16", "fp16"),
    "gradient_checkpointing": ("disable_gradient_checkpointing",), "reasoning": ("enable_thinking",),
    "resume_from_checkpoint": ("resume_from_checkpoint",),
}
UNMAPPED = ("overlong", "packing", "plot")  # conch's own: the module docstring says what LF does instead


def lf_keys(field: str) -> tuple[str, ...]:
    """The LF YAML keys a TrainConfig field becomes (notebook 04's table goes UI field -> field -> these)."""
    if field in SAME_MEANING:
        return (SAME_MEANING[field],)
    return CONVERTED.get(field, ())


def lf_settings(field: str, values: dict) -> str:
    """What LF's YAML ``values`` (``llamafactory_config``) set for a TrainConfig ``field``: "key: value, ..." with
    folders and files as ``paths.shown`` prints them, or "(LF's default)" where the YAML leaves it to LF."""
    from .paths import shown

    return ", ".join(f"{k}: {shown(values[k]) if k.endswith(('_dir', '_path')) else values[k]}"
                     for k in lf_keys(field) if k in values) or "(LF's default)"


# LF's chat templates (llamafactory/data/template.py) for the models this project trains
TEMPLATES = {"deepseekr1": "DeepSeek-R1-Distill (R1's <｜User｜>/<｜Assistant｜> template, with the think block)",
             "smollm2": "SmolLM2-Instruct, the demo model (ChatML with SmolLM's default system prompt)"}


def template_for(model_path: str | Path, name: str = "") -> str:
    """LF's template name for a model: from its hub id, else from the chat template it ships."""
    lowered = name.lower()
    if "deepseek-r1" in lowered:
        return "deepseekr1"
    if "smollm2" in lowered or name == "demo":
        return "smollm2"
    chat_template = ""
    config = Path(model_path) / "tokenizer_config.json"
    if config.exists():
        chat_template = str(json.loads(config.read_text(encoding="utf-8")).get("chat_template") or "")
    jinja = Path(model_path) / "chat_template.jinja"
    if jinja.exists():
        chat_template += jinja.read_text(encoding="utf-8")
    if "<｜Assistant｜>" in chat_template:
        return "deepseekr1"
    if "SmolLM" in chat_template:
        return "smollm2"
    raise ConchError(f"which LLaMA-Factory template fits {model_path} is not known here; pass template=... "
                     "(the names are in LF's llamafactory/data/template.py, e.g. qwen, llama3).")


def llamafactory_config(cfg, model_path: str | Path | None = None, template: str | None = None) -> dict:
    """``cfg`` (a ``conch.train.TrainConfig``) as LLaMA-Factory's YAML keys for ``llamafactory-cli train``.

    ``model_path``: the base model's folder (default: ``cfg.base_model`` resolved as conch trains it:
    ``demo``, ``auto``, a hub id found or downloaded once, a folder). ``template``: LF's chat template
    (default: ``deepseekr1`` for R1, ``smollm2`` for the demo). ``compute_type: auto`` is decided on
    this machine, as ``conch train`` decides it. Paths come out absolute, so the YAML runs from anywhere.
    """
    from .trainkit import dtype_flags

    name = cfg.base_model
    if model_path is None:
        from . import hub

        resolved = hub.resolve(cfg.base_model)
        model_path, name = resolved.path, resolved.name
    template = template or template_for(model_path, str(name))

    dataset_dir = Path(cfg.dataset_dir).resolve()
    for dataset in (cfg.dataset, cfg.eval_dataset):
        if dataset is None:
            continue
        info = dataset_dir / "dataset_info.json"
        registered = json.loads(info.read_text(encoding="utf-8")) if info.exists() else {}
        if dataset not in registered:
            raise ConchError(f"LLaMA-Factory reads datasets by their name in {info}, and '{dataset}' is not one "
                             f"({', '.join(registered) or 'no file there'}); register the file there first.")

    from .device import pick_device

    compute_type, _ = dtype_flags(cfg.compute_type, pick_device())

    values: dict = {
        "model_name_or_path": str(model_path), "template": template,
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": ",".join(cfg.lora_target),
        "dataset_dir": str(dataset_dir), "output_dir": str(Path(cfg.output_dir).resolve()),
    }
    for field, key in SAME_MEANING.items():
        values[key] = getattr(cfg, field)
    if values["max_samples"] is None:
        del values["max_samples"]
    if values["max_steps"] is None or values["max_steps"] <= 0:
        del values["max_steps"]
    if cfg.eval_dataset:
        del values["val_size"]
    evaluates = bool(cfg.eval_dataset) or cfg.val_size > 0
    if evaluates:
        values.update(eval_strategy="steps", per_device_eval_batch_size=cfg.per_device_train_batch_size)
    else:
        del values["eval_steps"], values["val_size"]
    if cfg.eval_dataset is None:
        values.pop("eval_dataset")
    # conch's warmup: a share of all steps below 1, a number of steps from 1 on (LF has one key for each)
    if cfg.warmup < 1:
        values["warmup_ratio"] = float(cfg.warmup)
    else:
        values["warmup_steps"] = int(cfg.warmup)
    values["bf16"] = compute_type == "bf16"
    values["fp16"] = compute_type == "fp16"
    # LF checkpoints activations unless told not to (slower, less memory); conch only when asked
    values["disable_gradient_checkpointing"] = not cfg.gradient_checkpointing
    if template == "deepseekr1":  # conch's reasoning: drop = answers after an empty think block, as LF without thinking
        values["enable_thinking"] = cfg.reasoning == "keep"
    if cfg.resume_from_checkpoint not in (None, "auto"):
        values["resume_from_checkpoint"] = str(Path(cfg.resume_from_checkpoint).resolve())
    values.update(plot_loss=True, report_to="none", dataloader_num_workers=0)
    return values


def write_config(cfg, path: str | Path, **kwargs) -> Path:
    """Write ``llamafactory_config(cfg, **kwargs)`` to ``path`` (YAML); returns the path."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(llamafactory_config(cfg, **kwargs), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    return path


def command(path: str | Path, venv: str = ".venv-lf") -> str:
    """The shell command that trains from the YAML at ``path`` (LF's venv from ``make llamafactory``)."""
    return f"{venv}/bin/llamafactory-cli train {path}"
