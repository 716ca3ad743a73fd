"""Stage 3b: preference tuning with DPO (Direct Preference Optimization) on top of the SFT model.

SFT taught the Magic Conch *what* to say. Customers also prefer *how* it says it: a playful,
anime-flavoured answer over a dry, academic one with the same facts. DPO learns that from pairs
(prompt, chosen, rejected) without a reward model: it raises the chosen answer's log-probability
and lowers the rejected one's, each measured *relative to a frozen reference model*, with
``beta`` setting how far the policy may drift from that reference.

How it is set up here (TRL's ``DPOTrainer``):

- The starting point is the **merged SFT model** (notebook 06, ``python -m conch merge``) with a
  **new LoRA adapter**. The reference model is then that same network with the adapter disabled,
  i.e. exactly the SFT model, at no extra memory. (Continuing the SFT adapter instead would need a
  second frozen copy of it as reference, TRL's "ref" adapter, and ``disable_adapter()`` would give
  the raw base rather than the SFT model, so the before/after comparison would be muddled.)
- The loss is DPO's plus ``sft_weight`` x the SFT loss of the chosen answers (the RPO recipe,
  LLaMA-Factory's ``pref_ftx``). Pure DPO can be won by making the rejected answers unlikely
  while the chosen ones hardly gain: on the demo model it reached reward accuracy 1.0 with not
  one held-out answer changing style. The SFT term makes the chosen style what the model writes.
- The reference log-probabilities are computed once before training
  (``precompute_ref_log_probs``), which saves one forward pass per step.
- The LM head runs only where there is a label (the answers), on the CPU too: TRL's fused head scores
  only those positions on a device with Triton and every position elsewhere (`labelled_positions_only`).
- Prompts are rendered with the model's own chat template exactly as at inference
  (`conch.data.split_prompt_answer`; for DeepSeek-R1 the answers follow an empty think block).
  With R1's tokenizer the prompt's last ``\\n`` merges with the answer's first one; TRL then starts
  the answer one token earlier and says so once in a warning.

Outputs, like `conch.train` (what both trainers share is in `conch.trainkit`): the adapter (on top of the
merged SFT model), ``checkpoint-N``, ``trainer_log.jsonl`` (loss and rewards per logging step), ``dpo.png``,
``dpo_config.yaml`` and ``dpo_results.json`` (including the reward accuracy over all training pairs at the end).

The style is scored without a judge model: `conch.style.style_score` counts answers carrying the
chosen style's markers (嘿嘿～, ✨, (≧▽≦) …) and the rejected style's (综上所述, 首先, In summary …), and
counts an answer for neither when it is degenerate (markers without content, a loop, a flood of markers).

What the "loss" is: with ``sft_weight > 0`` TRL optimises and logs one number, the DPO loss plus
``sft_weight`` x the SFT loss; it does not log the two parts. `loss_parts` estimates them from the
logged reward margin.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConchError
from .style import StyleScore, style_score
from .trainkit import (SharedConfig, clock, config_yaml, in_notebook, load_base_model, lora_config, memory_report,
                       plot_mode, progress_callback, read_log, resume_point, save_adapter_atomically,
                       training_arguments, training_device)

REWARD_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
LOGGED_KEYS = REWARD_KEYS + tuple(f"eval_{k}" for k in REWARD_KEYS)


@dataclass
class DpoConfig(SharedConfig):
    """DPO settings: its own below, and those SFT has too (`conch.trainkit.SharedConfig`: epochs, steps, scheduler,
    compute type, LoRA rank/alpha/targets, seed, checkpoints, plot). Defaults: DeepSeek-R1-Distill-Qwen-1.5B (merged
    SFT model) on a 24 GB GPU."""

    # model and data
    base_model: str = "outputs/magic_conch_merged"  # the merged SFT model (notebook 06 / conch merge)
    dataset: str = "magic_conch_dpo"  # a ranking dataset in dataset_dir/dataset_info.json, or a .json path
    heldout: str = "data/magic_conch_dpo_heldout.json"  # prompts for the style score, never trained on
    output_dir: str = "outputs/magic_conch_dpo"
    max_length: int = 1024  # longest prompt + answer, in tokens
    # DPO
    beta: float = 0.1  # how strongly the policy is tied to the reference: small = may move further
    loss_type: str = "sigmoid"  # sigmoid (the DPO paper) | ipo | hinge | robust …, see TRL's DPOConfig
    sft_weight: float = 1.0  # + this x the SFT loss of the chosen answers (RPO; LLaMA-Factory's pref_ftx); 0 = pure DPO
    precompute_ref_log_probs: bool = True  # reference log-probs once, before training
    pair_eval: bool = True  # at the end, reward accuracy and margin over all training pairs (one more pass)
    # optimisation
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 4  # pairs; each step runs 2x as many sequences
    # LoRA (a new adapter on the merged SFT model)
    lora_dropout: float = 0.0
    # bookkeeping
    logging_steps: int = 2
    save_total_limit: int = 2


@dataclass
class DpoResult:
    output_dir: Path
    metrics: dict  # train metrics + pair_accuracy / pair_margin over all training pairs
    log_history: list[dict]
    trainable_params: int
    total_params: int
    plot_path: Path | None
    model: object = None  # the trained PeftModel (adapter on), for a comparison without reloading
    tokenizer: object = None


# ---------------------------------------------------------------------------------------------
# the style before and after DPO


def load_heldout(path: str | Path) -> list[dict]:
    """Held-out prompts: a JSON list of {"prompt": ..., "category": ...}."""
    from .data import field_value, read_json

    path = Path(path)
    if not path.exists():
        raise ConchError(f"held-out prompt file {path} does not exist; set heldout to a JSON list of "
                         '{"prompt": ...} objects.')
    rows = read_json(path)
    if not isinstance(rows, list) or not rows:
        raise ConchError(f"{path} must hold a non-empty JSON list of {{\"prompt\": ...}} objects.")
    return [{"prompt": field_value(r, "prompt", i, path, required=True), "category": r.get("category", "")}
            for i, r in enumerate(rows)]


@dataclass
class StyleReport:
    rows: list[dict]  # prompt, category, before, after
    before: StyleScore
    after: StyleScore


def compare_style(model, tokenizer, prompts: list[str], answer_tokens: int = 96, batch_size: int = 64,
                  categories: list[str] | None = None) -> StyleReport:
    """Greedy answers with the DPO adapter off (the SFT model) and on, and their style scores."""
    from . import chat
    from .evaluate import answers_for

    gen = chat.GenConfig(answer_tokens=answer_tokens, temperature=0)
    with model.disable_adapter():
        before = answers_for(model, tokenizer, prompts, gen, batch_size)
    after = answers_for(model, tokenizer, prompts, gen, batch_size)
    categories = categories or [""] * len(prompts)
    rows = [{"prompt": p, "category": c, "before": b, "after": a}
            for p, c, b, a in zip(prompts, categories, before, after)]
    return StyleReport(rows, style_score(before), style_score(after))


def loss_parts(history: list[dict], sft_weight: float = 1.0) -> list[dict]:
    """The logged loss split into its DPO and SFT parts, estimated (TRL logs only their sum).

    The sigmoid DPO loss of one pair is ``-log σ(margin)``, where the margin is β x the difference of the
    log-ratios (what TRL logs as ``rewards/margins``, averaged over the logging window). ``-log σ`` is
    convex, so ``-log σ(mean margin)`` is a *lower bound* of the mean DPO part (Jensen), exact while every
    margin is the same (at the start, all 0: ln 2); the rest of the loss is ``sft_weight`` x the SFT part.
    """
    import math

    rows = []
    for h in history:
        if h.get("loss") is None or h.get("rewards/margins") is None:
            continue
        dpo_part = math.log1p(math.exp(-h["rewards/margins"])) if h["rewards/margins"] > -30 else -h["rewards/margins"]
        sft = (h["loss"] - dpo_part) / sft_weight if sft_weight else float("nan")
        rows.append({"step": h["current_steps"], "loss": h["loss"], "margin": h["rewards/margins"],
                     "dpo_at_least": dpo_part, "sft_at_most": sft})
    return rows


# ---------------------------------------------------------------------------------------------
# the plot


def plot_dpo(history: list[dict], path: str | Path | None = None, title: str = "", fig=None):
    """Left: the training loss. Right: reward accuracy, the rewards of chosen and rejected answers and
    their margin (a reward is beta x the log-probability ratio against the reference)."""
    import matplotlib

    if path is not None and fig is None and not in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if fig is None:
        fig = plt.figure(figsize=(10, 3.6))
    fig.clear()
    left, right = fig.subplots(1, 2)
    steps = lambda key: [(h["current_steps"], h[key]) for h in history if h.get(key) is not None]  # noqa: E731
    if steps("loss"):
        left.plot(*zip(*steps("loss")), color="tab:blue", label="training loss")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend(loc="upper right", fontsize=8)
    left.grid(alpha=0.3)
    if steps("rewards/accuracies"):
        right.plot(*zip(*steps("rewards/accuracies")), color="tab:green", label="reward accuracy")
    right.set_ylim(-0.05, 1.05)
    right.set_xlabel("step")
    right.set_ylabel("accuracy (chosen > rejected)")
    right.grid(alpha=0.3)
    twin = right.twinx()
    for key, label, color, style in (("rewards/chosen", "reward of chosen", "tab:orange", "-"),
                                     ("rewards/rejected", "reward of rejected", "tab:purple", "-"),
                                     ("rewards/margins", "margin (chosen - rejected)", "tab:red", "--")):
        if steps(key):
            twin.plot(*zip(*steps(key)), style, color=color, alpha=0.8, label=label)
    twin.axhline(0, color="grey", lw=0.8)
    twin.set_ylabel("reward")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    if handles:
        right.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------------
# the recipe


def preference_dataset(tokenizer, cfg: DpoConfig):
    """The pairs as text TRL tokenizes: prompt rendered as at inference, answers with the turn's end."""
    from datasets import Dataset

    from .data import load_pairs, split_prompt_answer

    pairs = load_pairs(cfg.dataset, cfg.dataset_dir, cfg.max_samples)
    bos = tokenizer.bos_token
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    rows = []
    for pair in pairs:
        prompt, chosen = split_prompt_answer(tokenizer, pair.messages + [{"role": "assistant", "content": pair.chosen}])
        _, rejected = split_prompt_answer(tokenizer, pair.messages + [{"role": "assistant", "content": pair.rejected}])
        if adds_bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]  # the tokenizer adds it again
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars for TRL's dataset preparation and reference pass (noise in a notebook)."""
    import datasets

    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


@contextlib.contextmanager
def labelled_positions_only():
    """TRL's fused LM head (``fused_lm_head=True``) on labelled positions only, on every device.

    TRL 1.16 gathers the positions whose label is set (the answers) before the head on a device with Triton and
    scores every position elsewhere (prompt and padding too, then zeroes them), to keep tile shapes fixed for
    compilers such as Neuron's. Eager PyTorch on a CPU has no such constraint, and the head (a 576 x 49,152
    product and a float32 log-softmax a position on the demo model) is a large share of a step: gathered, 8 DPO
    steps ran 13 % faster with bit-identical losses (docs/benchmarks.md). The switch is TRL's own
    (``trl.trainer.utils._use_triton``, pinned in constraints.txt; tests/test_dpo.py fails if it moves), restored
    on exit. Without it, the full scoring runs: slower, same numbers."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def _check_base(path: str) -> None:
    p = Path(path)
    if not p.exists() and (p.is_absolute() or path.startswith(("./", "../", "outputs/"))):
        raise ConchError(f"base_model {path} does not exist: DPO starts from the merged SFT model; run notebook 06 "
                         "or `python -m conch merge` first, or set base_model to a model folder.")


@labelled_positions_only()  # the whole run: TRL's reference pass, the steps and the final evaluation
def dpo(cfg: DpoConfig, callbacks: list | None = None) -> DpoResult:
    """Preference-tune ``cfg.base_model`` with a new LoRA adapter on ``cfg.dataset``'s pairs."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    mode = plot_mode(cfg.plot)
    if cfg.beta <= 0:
        raise ConchError(f"beta must be positive (0.1 is the usual value), got {cfg.beta}.")
    _check_base(cfg.base_model)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    resume = resume_point(cfg.resume_from_checkpoint, output_dir)

    resolved, device, compute_type = training_device(cfg.base_model, cfg.compute_type)
    model, tokenizer = load_base_model(resolved, device)
    peft_config = lora_config(model, cfg)
    pairs = preference_dataset(tokenizer, cfg)  # every record checked before the first step

    output_dir.mkdir(parents=True, exist_ok=True)
    args = training_arguments(
        cfg, compute_type, device.device, evaluate=False, args_class=DPOConfig, beta=cfg.beta,
        loss_type=[cfg.loss_type] + (["sft"] if cfg.sft_weight else []),
        loss_weights=[1.0] + ([cfg.sft_weight] if cfg.sft_weight else []), max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref_log_probs, remove_unused_columns=True)
    progress = progress_callback(output_dir, mode, plot=lambda h, title, fig: plot_dpo(h, title=title, fig=fig),
                                  keys=LOGGED_KEYS)
    with _quiet_datasets():
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=pairs, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[progress] + list(callbacks or []))
    trainer.remove_callback(PrinterCallback)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    main = trainer.is_world_process_zero()
    if main:
        print(f"model: {resolved.name} on {device} (reference: the same model with the adapter disabled)\n"
              f"LoRA r={cfg.lora_rank} alpha={cfg.lora_alpha}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f}%)\n"
              f"data: {len(pairs)} preference pairs, beta={cfg.beta}, loss={cfg.loss_type}"
              + (f" + {cfg.sft_weight:g} x SFT loss on the chosen answers" if cfg.sft_weight else "")
              + (f"\nresuming from {resume}" if resume else ""), flush=True)
        (output_dir / "dpo_config.yaml").write_text(config_yaml(cfg))

    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - started
    metrics = dict(result.metrics)
    if cfg.pair_eval:
        # the reward accuracy over *all* training pairs with the final adapter (the logged one is per batch)
        # the training pairs, already tokenized (with their precomputed reference log-probs), as the eval set
        trainer.eval_dataset = trainer.train_dataset
        with _quiet_datasets():
            final = trainer.evaluate()
        logged = progress.last_logs  # TRL logs the reward metrics of evaluate() rather than returning them
        metrics.update({"pair_accuracy": logged["eval_rewards/accuracies"],
                        "pair_margin": logged["eval_rewards/margins"], "pair_loss": final["eval_loss"]})
    memory = memory_report(device.device)

    plot_path = None
    history: list[dict] = []
    if main:
        save_adapter_atomically(trainer, output_dir)
        history = read_log(output_dir)
        if cfg.plot != "off":
            plot_path = output_dir / "dpo.png"
            fig = plot_dpo(history, plot_path, title=f"{resolved.name}: DPO beta={cfg.beta}, lr={cfg.learning_rate:g}")
            import matplotlib.pyplot as plt

            plt.close(fig)
        summary = {**metrics, "train_seconds": round(seconds, 1), "trainable_params": trainable,
                   "total_params": total, "base_model": resolved.name, "base_model_path": str(resolved.path),
                   "memory": memory}
        (output_dir / "dpo_results.json").write_text(json.dumps(summary, indent=2))
        on_pairs = (f"; on all {len(pairs)} pairs: reward accuracy {metrics['pair_accuracy']:.3f}, "
                    f"margin {metrics['pair_margin']:.3f}" if cfg.pair_eval else "")
        print(f"done in {clock(seconds)}: train loss {metrics.get('train_loss', float('nan')):.4f}{on_pairs}\n"
              f"memory: {memory}\nadapter saved to {output_dir}", flush=True)
    model = trainer.model
    model.eval()
    return DpoResult(output_dir, metrics, history, trainable, total, plot_path, model, tokenizer)
