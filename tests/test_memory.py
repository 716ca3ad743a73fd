import pytest

from conch import memory
from conch.memory import DEEPSEEK_R1_DISTILL_QWEN_1_5B as R1_1_5B
from conch.memory import GPUS, GiB


def test_param_count_of_r1_distill_1_5b():
    n = memory.count_params(R1_1_5B)
    assert abs(n - 1.777e9) / 1.777e9 < 0.005
    assert n == 1_777_088_000  # embeddings + lm_head + 28 layers (with q/k/v biases, norms) + norm
    assert memory.ModelShape.deepseek_r1_distill_qwen_1_5b() == R1_1_5B
    assert R1_1_5B.head_dim == 128 and R1_1_5B.kv_dim == 256


def test_tied_embeddings_drop_the_lm_head():
    from dataclasses import replace

    tied = replace(R1_1_5B, tied_embeddings=True)
    assert memory.count_params(R1_1_5B) - memory.count_params(tied) == 151936 * 1536


def test_lora_params():
    # per layer at r=1: q 1536+1536, k,v 1536+256, o 1536+1536, gate/up/down 1536+8960
    assert memory.lora_params(R1_1_5B, 1) == 28 * 41216
    assert memory.lora_params(R1_1_5B, 8) == 9_232_384
    assert memory.lora_params(R1_1_5B, 8, ("q", "v")) == 28 * 8 * (3072 + 1792)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        memory.lora_params(R1_1_5B, 8, ("q_proj",))


def test_bytes_per_param_of_the_states():
    n = memory.count_params(R1_1_5B)
    fp32 = memory.estimate(R1_1_5B, "full_fp32")
    bf16 = memory.estimate(R1_1_5B, "full_bf16")
    assert fp32.weights + fp32.gradients + fp32.optimizer == 16 * n
    assert bf16.weights == 2 * n and bf16.gradients == 2 * n and bf16.optimizer == 12 * n
    lora = memory.estimate(R1_1_5B, "lora_bf16", lora_rank=8)
    t = memory.lora_params(R1_1_5B, 8)
    assert lora.weights == 2 * n + 4 * t and lora.gradients == 4 * t and lora.optimizer == 8 * t
    q = memory.estimate(R1_1_5B, "qlora_4bit")
    assert 0.5 * n < q.weights < 0.5 * lora.weights


def test_activation_formula():
    s, b = 1024, 2
    per_layer = s * b * 1536 * (34 + 5 * 12 * s / 1536)
    assert memory.activation_bytes(R1_1_5B, b, s) == pytest.approx(28 * per_layer)
    assert memory.activation_bytes(R1_1_5B, b, s, bytes_per_value=4) == pytest.approx(56 * per_layer)
    e = memory.estimate(R1_1_5B, "lora_bf16", batch_size=b, seq_len=s)
    assert e.logits == b * s * 151936 * 4
    ckpt = memory.activation_bytes(R1_1_5B, b, s, gradient_checkpointing=True)
    assert ckpt < memory.activation_bytes(R1_1_5B, b, s) / 5


def test_ordering_and_fit_at_default_batch_2_seq_1024():
    totals = [memory.estimate(R1_1_5B, m, batch_size=2, seq_len=1024).total for m in memory.METHODS]
    assert totals == sorted(totals, reverse=True)  # fp32 > bf16 > LoRA > QLoRA
    assert len(set(totals)) == 4
    full_fp32, _, lora, qlora = totals
    assert lora < GPUS["RTX 4090 24GB"] and qlora < GPUS["RTX 4090 24GB"]
    assert full_fp32 > GPUS["RTX 4090 24GB"]


def test_memory_table_and_format():
    rows = memory.memory_table()
    assert [r["method"] for r in rows] == [memory.METHOD_LABELS[m] for m in memory.METHODS]
    assert rows[2]["fits"]["RTX 4090 24GB"] and not rows[0]["fits"]["RTX 4090 24GB"]
    assert all(r["fits"]["H100 80GB"] for r in rows)
    for r in rows:
        parts = r["weights"] + r["gradients"] + r["optimizer"] + r["activations"] + r["logits"]
        assert r["total"] == pytest.approx(parts)
    text = memory.format_table(rows)
    assert len(text.splitlines()) == 2 + len(rows)
    assert "LoRA" in text and "yes" in text and "no" in text


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="full_fp32"):
        memory.estimate(R1_1_5B, "full_fp16")


def test_plot_memory_draws_one_bar_per_method_and_part():
    import matplotlib

    matplotlib.use("Agg")
    ax = memory.plot_memory(memory.memory_table())
    assert len(ax.patches) == 4 * 5
    assert GiB == 2**30


def test_the_estimate_is_a_lower_bound_of_the_measured_h100_peak():
    """docs/benchmarks.md: LoRA r=8 on the 1.5B architecture, bf16, micro-batch 8 records of mean
    ~517 tokens: 33.93 GiB peak (19.83 GiB with liger-kernel). The estimate leaves out LoRA-dropout
    copies, the fp32 logits upcast and SwiGLU's extra tensors, so it must stay below both."""
    e = memory.estimate(R1_1_5B, "lora_bf16", batch_size=8, seq_len=517, lora_rank=8)
    assert e.total / GiB < 19.83 < 33.93
    assert "lower bound" in memory.estimate.__doc__ and "lower bound" in memory.__doc__


def test_shape_from_a_transformers_config_counts_what_the_model_has():
    import transformers

    qwen = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    llama = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    for config, bias in ((qwen, True), (llama, False)):
        shape = memory.ModelShape.from_config(config)
        assert shape.qkv_bias is bias and shape.tied_embeddings is config.tie_word_embeddings
        model = transformers.AutoModelForCausalLM.from_config(config)
        assert memory.count_params(shape) == model.num_parameters()


def test_lora_estimate_in_float32_doubles_the_base_and_the_activations():
    n = memory.count_params(R1_1_5B)
    bf16 = memory.lora_estimate(R1_1_5B, 4, 128, 8)
    fp32 = memory.lora_estimate(R1_1_5B, 4, 128, 8, float32=True)
    assert bf16 == memory.estimate(R1_1_5B, "lora_bf16", 4, 128, 8)
    assert fp32.weights - bf16.weights == 2 * n and fp32.activations == 2 * bf16.activations
    assert (fp32.gradients, fp32.optimizer, fp32.logits) == (bf16.gradients, bf16.optimizer, bf16.logits)


def test_measured_peak_reads_the_device_that_trained():
    assert memory.measured_peak({"gpu_allocated_gb": 1.0, "gpu_peak_gb": 20.5, "gpu_total_gb": 24.0}) == (
        20.5, "the GPU's peak allocated memory")
    assert memory.measured_peak({"cpu_peak_rss_gb": 3.2}) == (3.2, "this process's peak RSS")
    with pytest.raises(ValueError, match="no peak in the memory report"):
        memory.measured_peak({})
