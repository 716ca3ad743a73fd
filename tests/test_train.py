"""LoRA training on the tiny R1 model: seconds per test, real Trainer, real files."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conch import data, hub, train, trainkit
from conch.device import Device
from conch.errors import ConchError


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """20 Magic Conch records, in a folder with its own dataset_info.json."""
    folder = tmp_path_factory.mktemp("data")
    rows = json.load(open("data/magic_conch.json", encoding="utf-8"))[:20]
    (folder / "small.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps({"small": {"file_name": "small.json"}}))
    return folder


@pytest.fixture(scope="module")
def tiny_trainable(tmp_path_factory, small_data):
    """A tiny R1 model whose tokenizer knows the data and whose weights are large enough for LoRA."""
    from conch.tiny import build_tiny_r1

    rows = json.load(open(small_data / "small.json", encoding="utf-8"))
    texts = [r["instruction"] + r["output"] for r in rows]
    return build_tiny_r1(tmp_path_factory.mktemp("tiny"), texts=texts, init_std=0.2)


def config(model, small_data, out, **kw):
    values = dict(base_model=str(model), dataset="small", dataset_dir=str(small_data), output_dir=str(out),
                  cutoff_len=256, val_size=0.1, learning_rate=1e-2, max_steps=30, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, warmup=0, logging_steps=5, eval_steps=10, save_steps=10,
                  lora_rank=8, lora_alpha=16, lora_dropout=0.0, plot="lines")
    values.update(kw)
    return train.TrainConfig(**values)


def test_lora_training_lowers_the_loss_and_writes_everything(tiny_trainable, small_data, tmp_path):
    cfg = config(tiny_trainable, small_data, tmp_path / "run")
    result = train.train(cfg)
    losses = [h["loss"] for h in result.log_history if h.get("loss") is not None]
    assert losses[-1] < 0.6 * losses[0], losses
    assert 0 < result.trainable_params < 0.5 * result.total_params
    out = result.output_dir
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl", "loss.png",
                 "train_config.yaml", "train_results.json", "checkpoint-30"):
        assert (out / name).exists(), name
    assert not (out / ".staged.tmp").exists()
    log = trainkit.read_log(out)
    assert log[-1]["current_steps"] == 30 and any(h.get("eval_loss") for h in log)
    assert json.loads((out / "train_results.json").read_text())["trainable_params"] == result.trainable_params
    assert result.memory == json.loads((out / "train_results.json").read_text())["memory"]
    # the saved config starts with the stage's own fields and loads again as a --config file
    assert (out / "train_config.yaml").read_text().startswith("base_model: ")
    from conch.config import load_config

    assert load_config(train.TrainConfig, [out / "train_config.yaml"]) == cfg


def test_packed_loss_equals_padded_loss(tiny_trainable, small_data):
    """Padding-free packing must not let records attend to each other (needs use_cache=False)."""
    model, tok = hub.load_model(tiny_trainable)
    model.config.use_cache = False
    examples = data.build_examples(tok, "small", small_data, cutoff_len=256)[:6]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    with torch.no_grad():
        padded = model(**data.collator(tok, packing=False)(features)).loss
        packed_batch = data.collator(tok, packing=True)(features)
        packed = model(**packed_batch).loss
    assert packed_batch["input_ids"].shape[0] == 1  # one row, no padding
    # packing drops the first label of each record (it has no previous token in its own record),
    # which the padded path also never predicts: the two means cover the same tokens
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)


@pytest.mark.parametrize("packing", [False, True])
def test_the_head_at_labelled_positions_gives_the_full_loss(tiny_trainable, small_data, packing):
    """conch.loss: the LM head only where a label is set, the same loss as transformers' full computation."""
    from conch.loss import labelled_forward

    model, tok = hub.load_model(tiny_trainable, Device("cpu", torch.float32, "test"))
    model.config.use_cache = False
    examples = data.build_examples(tok, "small", small_data, cutoff_len=256)[:6]
    batch = data.collator(tok, packing=packing)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad():
        full = model(**batch)
        loss, outputs = labelled_forward(model, batch)
        wanted = batch["labels"][:, 1:] != -100
        summed, _ = labelled_forward(model, batch, num_items_in_batch=wanted.sum())
    assert outputs.logits.shape[0] == wanted.sum() < batch["input_ids"].numel()  # prompts (and padding) skipped
    assert abs(loss.item() - full.loss.item()) < 1e-5 and abs(summed.item() - full.loss.item()) < 1e-5
    assert torch.allclose(outputs.logits, full.logits[:, :-1][wanted], atol=1e-5)


def test_the_labelled_loss_is_scaled_as_transformers_scales_its_own(tiny_trainable, small_data, tmp_path, monkeypatch):
    """Trainer.compute_loss's bookkeeping is kept: a loss over the accumulated batch's tokens counts as scaled for
    gradient accumulation, and with several processes (tokens counted across devices) it is multiplied by their
    number, as transformers does for its own loss."""
    import accelerate

    model, tok = hub.load_model(tiny_trainable, Device("cpu", torch.float32, "test"))
    model.config.use_cache = False
    cfg = config(tiny_trainable, small_data, tmp_path / "scaled")
    examples = data.build_examples(tok, "small", small_data, cutoff_len=256)[:4]
    args = trainkit.training_arguments(cfg, "fp32", "cpu", evaluate=False)
    trainer = train.make_trainer(model, tok, args, examples, [], packing=True, callbacks=[])
    batch = data.collator(tok, packing=True)(train.features(examples))
    items = (batch["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        one = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        assert trainer.loss_is_scaled_for_ga is True
        monkeypatch.setattr(accelerate.Accelerator, "num_processes", property(lambda self: 2))
        two = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
        mean = trainer.compute_loss(model, dict(batch))
    assert trainer.loss_is_scaled_for_ga is False  # a per-batch mean: the Trainer divides it by the accumulation
    assert torch.allclose(two, 2 * one) and torch.allclose(mean, one)


def test_answer_loss_of_evaluate_uses_the_same_masking(tiny_trainable, small_data):
    from conch import evaluate

    model, tok = hub.load_model(tiny_trainable, Device("cpu", torch.float32, "test"))
    examples = data.build_examples(tok, "small", small_data, cutoff_len=256)[:5]
    batch = data.collator(tok, packing=False)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    with torch.no_grad():
        full = model(**batch).loss.item()
    assert abs(evaluate.answer_loss(model, tok, examples, batch_size=8) - full) < 1e-5


def test_bf16_training_on_a_cpu_keeps_lora_in_float32(tiny_trainable, small_data, tmp_path, monkeypatch):
    """Where the CPU has bf16 (forced here, emulated where it does not) the Trainer autocasts to bf16,
    the frozen base is bf16 and the LoRA weights stay float32, as on a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CONCH_CPU_DTYPE", "bf16")
    cfg = config(tiny_trainable, small_data, tmp_path / "bf16", max_steps=12, save_steps=12, eval_steps=6)
    resolved, device, compute_type = trainkit.training_device(cfg.base_model, cfg.compute_type)
    assert (device.dtype, compute_type) == (torch.bfloat16, "bf16")
    model, tok = trainkit.load_base_model(resolved, device)
    model = train.add_lora(model, cfg)
    dtypes = {n.split(".")[-2]: p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert set(dtypes.values()) == {torch.float32}
    args = trainkit.training_arguments(cfg, compute_type, device.device, evaluate=True)
    assert args.bf16 and args.use_cpu
    result = train.train(cfg)
    losses = [h["loss"] for h in result.log_history if h.get("loss") is not None]
    assert losses[-1] < losses[0] and all(loss == loss for loss in losses)  # lower, and no NaN


def test_resume_after_a_hard_kill(tiny_trainable, small_data, tmp_path):
    """Kill -9 after checkpoint-10, resume with auto: ends at the same step, no checkpoint lost."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from transformers import TrainerCallback
        from conch import train

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 13:
                    os.kill(os.getpid(), signal.SIGKILL)

        cfg = train.TrainConfig(base_model={str(tiny_trainable)!r}, dataset="small", dataset_dir={str(small_data)!r},
            output_dir={str(out)!r}, cutoff_len=256, val_size=0, learning_rate=3e-3, max_steps=30,
            per_device_train_batch_size=4, warmup=0, logging_steps=5, save_steps=10, plot="lines")
        train.train(cfg, callbacks=[Kill()])
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert trainkit.last_checkpoint(out).name == "checkpoint-10"
    assert not (out / "adapter_model.safetensors").exists()

    result = train.train(config(tiny_trainable, small_data, out, val_size=0, resume_from_checkpoint="auto"))
    log = trainkit.read_log(out)
    assert log[-1]["current_steps"] == 30 and result.metrics["epoch"] > 0
    steps = [h["current_steps"] for h in log]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice
    assert {p.name for p in out.glob("checkpoint-*")} >= {"checkpoint-10", "checkpoint-20", "checkpoint-30"}
    assert (out / "adapter_model.safetensors").exists()


def test_two_processes_with_accelerate(tiny_trainable, small_data, tmp_path):
    """`accelerate launch` runs the same CLI on several devices; here two CPU processes.

    The last step is an eval step, so no final evaluate() runs: train() decides that from
    trainer.state.log_history, which every rank holds (the Progress history is rank 0's only; deciding
    from it sent rank 1 alone into a collective evaluate()). On CPU/gloo that mismatch did not hang
    (this test passed with the old code too); it checks the multi-process run with eval end to end."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "conch", "train", "--config", "configs/magic_conch_lora.yaml",
           "--base_model", str(tiny_trainable), "--dataset", "small", "--dataset_dir", str(small_data),
           "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2",
           "--cutoff_len", "256", "--val_size", "0.2", "--eval_dataset", "none", "--eval_steps", "3",
           "--save_steps", "6",
           "--logging_steps", "2", "--learning_rate", "3e-3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "CONCH_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    assert result.stdout.count("adapter saved to") == 1  # only the main process reports
    assert trainkit.read_log(out)[-1]["current_steps"] == 6 and trainkit.read_log(out)[-1]["eval_loss"] is not None


@pytest.mark.parametrize("override, message", [
    (dict(lora_target=["q_proj", "attn_qkv"]), "not module names"),
    (dict(compute_type="bf16"), "needs a GPU or a CPU with native bfloat16"),
    (dict(compute_type="fp16"), "fp16 needs a GPU"),
    (dict(compute_type="fp8"), "compute_type must be"),
    (dict(plot="gif"), "plot must be"),
    (dict(reasoning="sometimes"), "reasoning must be drop or keep"),
    (dict(resume_from_checkpoint="/no/such/checkpoint"), "not a complete checkpoint"),
])
def test_bad_settings_are_one_sentence(tiny_trainable, small_data, tmp_path, override, message, monkeypatch):
    monkeypatch.setenv("CONCH_CPU_DTYPE", "fp32")  # as on a CPU without native bf16, whatever this one has
    with pytest.raises(ConchError, match=message):
        train.train(config(tiny_trainable, small_data, tmp_path / "bad", **override))


def test_reasoning_is_a_training_choice(tiny_trainable, small_data):
    """reasoning=keep trains the think block of records that carry one; drop trains an empty one."""
    rows = json.load(open(small_data / "small.json", encoding="utf-8"))
    rows[0]["output"] = "<think>\n先想一想。\n</think>\n\n" + rows[0]["output"]
    folder = small_data.parent / "reasoning_data"
    folder.mkdir(exist_ok=True)
    (folder / "r.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    tok = hub.load_tokenizer(tiny_trainable)
    keep = data.build_examples(tok, str(folder / "r.json"), cutoff_len=256, reasoning="keep")
    drop = data.build_examples(tok, str(folder / "r.json"), cutoff_len=256, reasoning="drop")
    trained = lambda e: tok.decode([t for t in e.labels if t != data.IGNORE_INDEX])  # noqa: E731
    assert trained(keep[0]).startswith("先想一想。\n</think>\n\n") and trained(drop[0]).startswith("\n</think>\n\n")
    assert [trained(e) for e in keep[1:]] == [trained(e) for e in drop[1:]]  # records without reasoning: the same


def test_shipped_config_loads():
    from conch.config import load_config

    cfg = load_config(train.TrainConfig, "configs/magic_conch_lora.yaml")
    assert (cfg.base_model == "auto" and cfg.lora_target == trainkit.LORA_TARGETS and not cfg.packing
            and cfg.reasoning == "drop")
    cpu = load_config(train.TrainConfig, ["configs/magic_conch_lora.yaml", "configs/magic_conch_lora_cpu.yaml"])
    assert cpu.base_model == "demo" and cpu.packing
    # settings are chosen on a validation split of the training records, never on notebook 05's test set
    assert cpu.eval_dataset is None and cpu.val_size > 0 and cfg.eval_dataset is None


def test_notebook_pieces_build_what_train_builds(tiny_r1, small_data, tmp_path):
    """Notebook 04 builds the run piece by piece from conch.train's public steps; train.train() is
    made of the same steps: the same adapter, the same TrainingArguments, the same batches."""
    from peft import get_peft_model
    from transformers import TrainerCallback, set_seed

    cfg = config(tiny_r1, small_data, tmp_path / "run", max_steps=2, save_steps=2, eval_steps=2)

    # the notebook's cells, one by one
    set_seed(cfg.seed)
    resolved, device, compute_type = trainkit.training_device(cfg.base_model, cfg.compute_type)
    model, tokenizer = trainkit.load_base_model(resolved, device)
    model = get_peft_model(model, trainkit.lora_config(model, cfg))
    examples, train_ex, val_ex = train.training_examples(tokenizer, cfg)
    args = trainkit.training_arguments(cfg, compute_type, device.device, evaluate=bool(val_ex))
    trainer = train.make_trainer(model, tokenizer, args, train_ex, val_ex, cfg.packing,
                                 [trainkit.progress_callback(tmp_path / "run", "off")])
    pieces = {"trainable": [n for n, p in model.named_parameters() if p.requires_grad],
              "counts": model.get_nb_trainable_parameters(), "args": args.to_dict(),
              "batch": trainer.data_collator(train.features(train_ex[:4])),
              "val": train.features(val_ex)}
    assert pieces["trainable"] and all("lora_" in n for n in pieces["trainable"])
    assert set(pieces["batch"]) >= {"input_ids", "labels", "position_ids"}

    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
            loader = train_dataloader
            seen.update(trainable=[n for n, p in model.named_parameters() if p.requires_grad],
                        counts=model.get_nb_trainable_parameters(), args=args.to_dict(),
                        batch=loader.collate_fn(list(loader.dataset)[:4]),
                        val=list(kw["eval_dataloader"].dataset) if kw.get("eval_dataloader") else None)

    result = train.train(cfg, callbacks=[Capture()])
    assert seen["trainable"] == pieces["trainable"]
    assert seen["counts"] == pieces["counts"] == (result.trainable_params, result.total_params)
    assert seen["args"] == pieces["args"]
    assert seen["batch"].keys() == pieces["batch"].keys()
    for key in pieces["batch"]:
        assert torch.equal(seen["batch"][key], pieces["batch"][key]), key
    if seen["val"] is not None:
        assert seen["val"] == pieces["val"]
