"""Smoke tests of bench/: each script runs end to end on the tiny model and reports every field.

Timings are not checked (they belong in docs/benchmarks.md); the shape of the output is.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

ENV = {**os.environ, "CONCH_THREADS": os.environ.get("CONCH_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}


def run(script: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_throughput_compares_padded_and_packed(tmp_path):
    out = tmp_path / "train.json"
    stdout = run("train_throughput.py", "--model", "tiny", "--runs", "padded,packed", "--steps", "3",
                 "--warmup-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--cutoff", "192",
                 "--max-samples", "8", "--out", str(out), "--plot", str(tmp_path / "train.png"))
    for column in ("tokens/s", "vs padded", "step s", "peak GB", "loss", "MFU"):
        assert column in stdout
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["results"]] == ["padded", "packed"] and not report["failures"]
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_gb"] > 0
        assert r["steps_timed"] == 2 and len(r["losses"]) == 3 and r["mfu"] is None  # no MFU on CPU
        assert 0 < r["trainable_params"] < r["total_params"]
    padded, packed = report["results"]
    assert padded["padding_share"] > 0 and packed["padding_share"] == 0
    assert padded["speedup_vs_padded"] == 1.0
    # the same records, order and seed: packing changes the speed, not what is learned
    assert packed["losses"] == pytest.approx(padded["losses"], rel=1e-3)
    assert (tmp_path / "train.png").stat().st_size > 0


def test_serve_throughput_runs_both_servers(tmp_path):
    out = tmp_path / "serve.json"
    stdout = run("serve_throughput.py", "--model", "tiny", "--concurrency", "1,2", "--max-tokens", "4",
                 "--rounds", "1", "--min-requests", "2", "--threads", "1", "--work-dir", str(tmp_path),
                 "--out", str(out))
    for column in ("out tok/s", "req/s", "p50 s", "p95 s", "TTFT p50", "stream tok/s"):
        assert column in stdout
    report = json.loads(out.read_text())
    levels = report["levels"]
    assert [(lv["server"], lv["concurrency"]) for lv in levels] == [("conch", 1), ("conch", 2), ("seeds", 1),
                                                                     ("seeds", 2)]
    for lv in levels:
        assert lv["errors"] == 0 and lv["requests"] == 2 and lv["output_tokens"] > 0 and lv["tokens_per_s"] > 0
        assert lv["p95_latency_s"] >= lv["p50_latency_s"] > 0
        assert (lv["p50_ttft_s"] is not None) == (lv["server"] == "conch")  # only conch streams
    assert [c["concurrency"] for c in report["comparison"]] == [1, 2]
    assert set(report["startup_s"]) == {"conch", "seeds"} and all(s > 0 for s in report["startup_s"].values())
    assert "conch ready in" in stdout


def test_r1_arch_has_the_real_models_numbers():
    import torch
    from transformers import Qwen2ForCausalLM

    import r1_arch

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(r1_arch.arch_config())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.777e9, rel=1e-3)
    assert r1_arch.flops_per_token(model) == pytest.approx(4 * 1.544e9, rel=1e-3)  # FIELD_NOTES


def test_r1_arch_tokenizer_decodes_every_id():
    import r1_arch

    tok = r1_arch.build_tokenizer()
    assert len(tok) == r1_arch.VOCAB
    assert tok.decode([300, 151_000, r1_arch.VOCAB - 8], skip_special_tokens=True).strip()
    prompt = tok.apply_chat_template([{"role": "user", "content": "你是谁？"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert max(ids) < r1_arch.VOCAB and tok.decode(ids) == prompt


def test_vs_llamafactory_runs_conch_and_says_why_a_run_is_skipped(tmp_path):
    """The LF runs themselves are docs/benchmarks.md's (LF's CLI is tested in tests/test_llamafactory.py)."""
    from conch import device

    stdout = run("vs_llamafactory.py", "--runs", "lf-bf16", "conch", "--max_steps", "2", "--threads", "1",
                 "--out", str(tmp_path))
    rows = {r["run"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    conch = rows["conch"]
    assert conch["train_runtime_s"] > 0 and conch["train_loss"] > 0 and conch["peak_rss_gib"] > 0.3
    assert conch["identity"] is None  # not judged after 2 steps
    if not device.cpu_has_bf16():
        assert "no native bf16" in rows["lf-bf16"]["skipped"]
    assert "| conch |" in stdout
