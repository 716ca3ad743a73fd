"""conch.llamafactory: a TrainConfig as LLaMA-Factory's YAML (fast), and LF 0.9.5 training from it, its adapter
loaded by conch (slow: LF's own venv, `make llamafactory`)."""

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conch import llamafactory, train
from conch.config import load_config
from tests import venv_builds
from conch.errors import ConchError

REPO = Path(__file__).resolve().parent.parent
LF_CLI = REPO / ".venv-lf" / "bin" / "llamafactory-cli"
CONFIGS = [REPO / "configs" / "magic_conch_lora.yaml", REPO / "configs" / "magic_conch_lora_cpu.yaml"]


def model_folder(tmp_path, chat_template: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return folder


def test_the_cpu_run_as_llamafactory_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(train.TrainConfig, CONFIGS)
    model = model_folder(tmp_path, "{% for m in messages %}<|im_start|>…You are a helpful AI assistant named SmolLM")
    values = llamafactory.llamafactory_config(cfg, model_path=model)
    assert values == {
        "model_name_or_path": str(model), "template": "smollm2", "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "dataset_dir": str(REPO / "data"), "output_dir": str(REPO / "outputs" / "magic_conch_lora"),
        "dataset": "magic_conch", "cutoff_len": 1024, "val_size": 0.1, "learning_rate": 1e-3,
        "num_train_epochs": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0, "lr_scheduler_type": "constant_with_warmup", "weight_decay": 0.0,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "seed": 42, "logging_steps": 4, "eval_steps": 23,
        "save_steps": 46, "save_total_limit": 3, "eval_strategy": "steps", "per_device_eval_batch_size": 4,
        "warmup_ratio": 0.05, "bf16": False, "fp16": False, "disable_gradient_checkpointing": True,
        "plot_loss": True, "report_to": "none", "dataloader_num_workers": 0,
    }
    path = llamafactory.write_config(cfg, tmp_path / "lf.yaml", model_path=model)
    import yaml

    assert yaml.safe_load(path.read_text()) == values
    assert llamafactory.command(path) == f".venv-lf/bin/llamafactory-cli train {path}"
    # notebook 04's table: what LF's YAML sets for each field, folders shown relative to the working directory
    assert llamafactory.lf_settings("learning_rate", values) == "learning_rate: 0.001"
    assert llamafactory.lf_settings("compute_type", values) == "bf16: False, fp16: False"
    assert llamafactory.lf_settings("output_dir", values) == "output_dir: outputs/magic_conch_lora"
    assert llamafactory.lf_settings("max_samples", values) == "(LF's default)"


def test_r1_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = train.TrainConfig(reasoning="drop", warmup=5, max_steps=3, val_size=0.0, compute_type="fp32",
                            max_samples=16, gradient_checkpointing=True,
                            resume_from_checkpoint="outputs/x/checkpoint-4")
    model = model_folder(tmp_path, "{{ bos_token }}<｜User｜>{{ q }}<｜Assistant｜>")
    values = llamafactory.llamafactory_config(cfg, model_path=model)
    assert values["template"] == "deepseekr1" and values["enable_thinking"] is False
    assert values["warmup_steps"] == 5 and "warmup_ratio" not in values
    assert values["max_steps"] == 3 and values["max_samples"] == 16
    assert "val_size" not in values and "eval_strategy" not in values and "eval_steps" not in values
    assert values["disable_gradient_checkpointing"] is False
    assert values["resume_from_checkpoint"] == str(REPO / "outputs" / "x" / "checkpoint-4")
    keep = dataclasses.replace(cfg, reasoning="keep")
    assert llamafactory.llamafactory_config(keep, model_path=model)["enable_thinking"] is True
    # the hub id decides before the files do
    assert llamafactory.template_for(tmp_path, "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") == "deepseekr1"


def test_what_llamafactory_cannot_read_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    model = model_folder(tmp_path, "{{ messages }}")
    with pytest.raises(ConchError, match="template=..."):
        llamafactory.llamafactory_config(train.TrainConfig(compute_type="fp32"), model_path=model)
    with pytest.raises(ConchError, match="register the file there first"):
        llamafactory.llamafactory_config(train.TrainConfig(dataset="data/magic_conch.json", compute_type="fp32"),
                                         model_path=model, template="qwen")


def test_every_train_config_field_is_mapped_or_said_unmapped():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert fields == set(llamafactory.SAME_MEANING) | set(llamafactory.CONVERTED) | set(llamafactory.UNMAPPED)
    assert llamafactory.lf_keys("warmup") == ("warmup_ratio", "warmup_steps")
    assert llamafactory.lf_keys("lora_rank") == ("lora_rank",) and llamafactory.lf_keys("packing") == ()


# ---------------------------------------------------------------------------------------------
# slow: LLaMA-Factory itself (tests/conftest.py's SLOW)

MISSING = "LLaMA-Factory's venv .venv-lf is not built: run `make llamafactory`."


@pytest.fixture
def lf_cli():
    """LF's command line; skipped where .venv-lf is not built, except on CI (CI set), where it fails."""
    venv_builds.wait_for("llamafactory")  # `make test` builds it in the background
    if not LF_CLI.exists():
        if os.environ.get("CI"):
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    return LF_CLI


def test_llamafactory_cli_trains_an_adapter_conch_loads(lf_cli, tiny_r1, tmp_path, monkeypatch):
    """LF 0.9.5 trains 3 steps on data/magic_conch (unchanged) from llamafactory_config's YAML on the tiny R1
    (LF's deepseekr1 template); conch chats with the adapter and merges it."""
    monkeypatch.chdir(REPO)
    cfg = train.TrainConfig(base_model=str(tiny_r1), output_dir=str(tmp_path / "lf_lora"), max_steps=3,
                            per_device_train_batch_size=2, gradient_accumulation_steps=1, max_samples=16,
                            val_size=0.0, logging_steps=1, save_steps=100, compute_type="fp32", cutoff_len=256)
    config = llamafactory.write_config(cfg, tmp_path / "lf.yaml", model_path=tiny_r1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DISABLE_VERSION_CHECK": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    done = subprocess.run([str(lf_cli), "train", str(config)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"llamafactory-cli train: {time.monotonic() - start:.0f} s")
    adapter = Path(cfg.output_dir)
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    state = json.loads((adapter / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    from conch import chat, merge

    model, tokenizer = chat.load(str(tiny_r1), adapter)
    reply = chat.generate(model, tokenizer, "你是谁？", chat.GenConfig(max_new_tokens=8, temperature=0))
    assert reply.completion_tokens > 0
    # merge folds LF's lora_B·lora_A into the weights and checks the logits against base + adapter
    result = merge.merge(merge.MergeConfig(base_model=str(tiny_r1), adapter=str(adapter),
                                           output_dir=str(tmp_path / "merged"), dtype="fp32"))
    assert result.relative_diff <= result.tolerance and (result.output_dir / "config.json").exists()
