"""How much GPU memory does fine-tuning need? A back-of-the-envelope estimator.

Training memory = weights + gradients + optimizer state + activations (+ logits).
The first three depend only on the number of parameters and the bytes each one costs;
activations depend on batch size and sequence length.

Bytes per parameter (AdamW keeps two fp32 moments, 8 bytes):

    full fp32        weights 4 + grads 4 + Adam 8                         = 16
    full bf16 mixed  weights 2 + grads 2 + fp32 master 4 + Adam 8         = 16
    LoRA bf16        frozen base 2;   trainable adapters 16 (fp32 4 + 4 + 8)
    QLoRA 4-bit      frozen linear layers ~0.5 + quantization constants,
                     embeddings / lm_head / norms stay bf16 (2);
                     trainable adapters 16

The fp32 master copy of mixed precision is counted under "optimizer", as in the ZeRO paper
(Rajbhandari et al. 2020: 2 + 2 + 12 bytes).

Activations (no gradient checkpointing) follow Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", per transformer layer in half precision:

    s * b * h * (34 + 5 * a * s / h)  bytes

s = sequence length, b = batch size, h = hidden size, a = attention heads. The 5as/h term is
the attention score matrix of eager attention; FlashAttention / SDPA do not store it. The 34
assumes a 4h MLP; Qwen2's SwiGLU MLP differs a little, which is within the accuracy of an
estimate. In fp32 training every activation takes twice the bytes. The logits add at least one
fp32 copy: b * s * vocab * 4 bytes.

With gradient checkpointing only each layer's input is kept (2 * s * b * h bytes a layer, in
half precision) plus one layer's full activations while it is recomputed.

The estimate is a lower bound. Besides the CUDA context (~0.5 GB), allocator fragmentation and
temporary buffers, it leaves out: the copies of each adapted projection's input that LoRA dropout
makes (one per projection, fp32 when the adapter is fp32); the fp32 upcast of the logits and its
gradient in the cross-entropy (several vocab-sized tensors, not the one counted here); and SwiGLU's
three intermediate tensors (gate, up and their product) where the formula assumes a 4h MLP.
Measured against it (docs/benchmarks.md): LoRA r=8 on the 1.5B architecture, bf16, micro-batch 8
records of ~517 tokens, peaked at 33.9 GiB on an H100 where this estimate gives ~15 GiB (19.8 GiB
with liger-kernel's fused loss, which drops the fp32 logits). Plan with a measured peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GiB = 2**30

METHODS = ("full_fp32", "full_bf16", "lora_bf16", "qlora_4bit")
METHOD_LABELS = {
    "full_fp32": "Full FT, fp32",
    "full_bf16": "Full FT, bf16 mixed",
    "lora_bf16": "LoRA, bf16 base",
    "qlora_4bit": "QLoRA, 4-bit base",
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# Usable memory as the cards report it (the "24 GB" of a 4090 is 24 GiB).
GPUS = {
    "RTX 4090 24GB": 24 * GiB,
    "A100 40GB": 40 * GiB,
    "A100 80GB": 80 * GiB,
    "H100 80GB": 80 * GiB,
}

# NF4 stores 4 bits a weight; one absmax a block of 64. With double quantization the absmax
# is 8-bit, plus one fp32 constant per 256 blocks (Dettmers et al. 2023, QLoRA).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only (Qwen2 / Llama style) transformer that set its size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has biases on q, k, v; Llama does not

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of the seven linear layers in one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q": (h, h),
            "k": (h, kv),
            "v": (h, kv),
            "o": (h, h),
            "gate": (h, i),
            "up": (h, i),
            "down": (i, h),
        }

    @classmethod
    def deepseek_r1_distill_qwen_1_5b(cls) -> "ModelShape":
        return DEEPSEEK_R1_DISTILL_QWEN_1_5B

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """The shape of a loaded model from its transformers config (Qwen2 has q/k/v biases; Llama says
        whether it has them in ``attention_bias``)."""
        bias = getattr(config, "attention_bias", None)
        return cls(vocab=config.vocab_size, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   qkv_bias=config.model_type == "qwen2" if bias is None else bool(bias))


DEEPSEEK_R1_DISTILL_QWEN_1_5B = ModelShape(
    vocab=151936, hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
    tied_embeddings=False, qkv_bias=True,
)


def param_breakdown(shape: ModelShape) -> dict[str, int]:
    """Parameters by group: embeddings, lm_head, linear (decoder weight matrices), other."""
    linear = sum(i * o for i, o in shape.linear_shapes().values())
    bias = (shape.hidden + 2 * shape.kv_dim) if shape.qkv_bias else 0
    norms = 2 * shape.hidden  # input and post-attention RMSNorm
    return {
        "embeddings": shape.vocab * shape.hidden,
        "lm_head": 0 if shape.tied_embeddings else shape.vocab * shape.hidden,
        "linear": shape.layers * linear,
        "other": shape.layers * (bias + norms) + shape.hidden,  # + final norm
    }


def count_params(shape: ModelShape) -> int:
    """Total parameters (DeepSeek-R1-Distill-Qwen-1.5B: 1,777,088,000)."""
    return sum(param_breakdown(shape).values())


def lora_params(shape: ModelShape, rank: int, targets=LORA_TARGETS) -> int:
    """Trainable LoRA parameters: r * (in + out) for each adapted linear layer, in every layer."""
    shapes = shape.linear_shapes()
    unknown = set(targets) - set(shapes)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; choose from {list(shapes)}")
    return shape.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of training memory; `total` is their sum."""

    method: str
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int,
                     bytes_per_value: int = 2, gradient_checkpointing: bool = False) -> float:
    """Transformer-layer activations kept for the backward pass, in bytes.

    Without checkpointing: layers * s*b*h * (34 + 5*a*s/h) half-precision bytes (Korthikanti et
    al. 2022), scaled by bytes_per_value / 2. With checkpointing: layers * 2*s*b*h (each layer's
    input) + one layer's full activations.
    """
    s, b, h, a = seq_len, batch_size, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + 5 * a * s / h)
    if gradient_checkpointing:
        total = shape.layers * 2 * s * b * h + per_layer
    else:
        total = shape.layers * per_layer
    return total * bytes_per_value / 2


def estimate(shape: ModelShape, method: str, batch_size: int = 2, seq_len: int = 1024,
             lora_rank: int = 8, lora_targets=LORA_TARGETS,
             gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Estimate training memory for one of METHODS: a lower bound (see the module docstring for the
    sources and for what it leaves out: LoRA-dropout copies, the fp32 logits upcast, SwiGLU's three
    activation tensors; the H100 run peaked at about twice this estimate).

    bytes = weights + gradients + optimizer + activations + logits, where for n parameters and
    t trainable LoRA parameters:
      full_fp32   4n + 4n + 8n;            activations in fp32 (2x the half-precision formula)
      full_bf16   2n + 2n + (4 + 8)n;      fp32 master copy counted under optimizer
      lora_bf16   (2n + 4t) + 4t + 8t
      qlora_4bit  (~0.516 n_linear + 2 n_rest + 4t) + 4t + 8t
    activations = activation_bytes(...) (Korthikanti et al.), logits = batch * seq * vocab * 4.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    n = count_params(shape)
    act_bytes = 4 if method == "full_fp32" else 2
    acts = activation_bytes(shape, batch_size, seq_len, act_bytes, gradient_checkpointing)
    logits = batch_size * seq_len * shape.vocab * 4
    if method == "full_fp32":
        return MemoryEstimate(method, 4 * n, 4 * n, 8 * n, acts, logits)
    if method == "full_bf16":
        return MemoryEstimate(method, 2 * n, 2 * n, (4 + 8) * n, acts, logits)
    t = lora_params(shape, lora_rank, lora_targets)
    if method == "lora_bf16":
        frozen = 2 * n
    else:  # qlora_4bit: decoder linear layers in NF4, the rest stays bf16
        groups = param_breakdown(shape)
        frozen = NF4_BYTES * groups["linear"] + 2 * (n - groups["linear"])
    # adapters are trained in fp32: weight 4 + grad 4 + Adam 8 = 16 bytes each
    return MemoryEstimate(method, frozen + 4 * t, 4 * t, 8 * t, acts, logits)


def lora_estimate(shape: ModelShape, batch_size: int, seq_len: int, lora_rank: int = 8,
                  float32: bool = False) -> MemoryEstimate:
    """LoRA training memory as the run trains: the base in bf16 (a GPU, a CPU with native bf16), or with
    ``float32`` the base weights at 4 bytes and every activation at twice bf16's (a CPU without bf16)."""
    e = estimate(shape, "lora_bf16", batch_size, seq_len, lora_rank)
    if not float32:
        return e
    return replace(e, method="lora_fp32", weights=e.weights + 2 * count_params(shape), activations=2 * e.activations)


def measured_peak(report: dict) -> tuple[float, str]:
    """The peak of a training run's memory report (``trainkit.memory_report``: what ``train.fit`` returns as
    ``memory``), in GiB, and what it is: on a GPU the memory torch allocated there, on a CPU the process's peak
    RSS. An estimate is compared with the memory of the device that trained, never with host RAM on a GPU run."""
    if "gpu_peak_gb" in report:
        return report["gpu_peak_gb"], "the GPU's peak allocated memory"
    if "cpu_peak_rss_gb" in report:
        return report["cpu_peak_rss_gb"], "this process's peak RSS"
    raise ValueError(f"no peak in the memory report {report}: expected gpu_peak_gb or cpu_peak_rss_gb")


def memory_table(shape: ModelShape = DEEPSEEK_R1_DISTILL_QWEN_1_5B, batch_size: int = 2,
                 seq_len: int = 1024, lora_rank: int = 8, gpus: dict = GPUS,
                 gradient_checkpointing: bool = False, headroom: float = 1 * GiB) -> list[dict]:
    """One row a method: GiB of each part, total, and whether it fits each GPU.

    A method fits a GPU when total + headroom <= capacity; the headroom (1 GiB by default) stands
    for the CUDA context and allocator slack that the estimate leaves out.
    """
    rows = []
    for m in METHODS:
        e = estimate(shape, m, batch_size, seq_len, lora_rank,
                     gradient_checkpointing=gradient_checkpointing)
        row = {"method": METHOD_LABELS[m]}
        row.update({k: v / GiB for k, v in asdict(e).items() if k != "method"})
        row["total"] = e.total / GiB
        row["fits"] = {g: e.total + headroom <= cap for g, cap in gpus.items()}
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of `memory_table` rows, GiB with one decimal."""
    cols = {"weights": "weights", "gradients": "grads", "optimizer": "optim",
            "activations": "acts", "logits": "logits", "total": "TOTAL"}
    gpus = list(rows[0]["fits"])
    # "RTX 4090 24GB" -> "4090", "A100 40GB" -> "A100-40"
    short = {g: g.replace("RTX ", "").replace(" 24GB", "").replace("GB", "").replace(" ", "-")
             for g in gpus}
    head = (f"{'GiB':<20}" + "".join(f"{c:>8}" for c in cols.values()) + "  | fits:"
            + "".join(f"{short[g]:>8}" for g in gpus))
    lines = [head, "-" * len(head)]
    for r in rows:
        fits = "".join(f"{'yes' if r['fits'][g] else 'no':>8}" for g in gpus)
        lines.append(f"{r['method']:<20}" + "".join(f"{r[c]:>8.1f}" for c in cols) + "  |      " + fits)
    return "\n".join(lines)


def plot_memory(rows: list[dict], gpus: dict = GPUS, ax=None):
    """Stacked bars of the memory parts for each method, with a line at each GPU's capacity."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4))
    parts = ["weights", "gradients", "optimizer", "activations", "logits"]
    labels = [r["method"] for r in rows]
    bottom = [0.0] * len(rows)
    for p in parts:
        vals = [r[p] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for t, r in zip(bottom, rows):
        ax.text(r["method"], t + 0.5, f"{t:.1f}", ha="center", va="bottom", fontsize=9)
    caps = {}
    for name, cap in gpus.items():  # one line per capacity, named by all GPUs that have it
        caps.setdefault(cap / GiB, []).append(name)
    for cap, names in caps.items():
        ax.axhline(cap, color="gray", ls="--", lw=1)
        ax.text(len(rows) - 0.5, cap, " / ".join(names), ha="right", va="bottom", fontsize=8,
                color="dimgray")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, 1.08 * max(max(bottom), max(caps)))
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1, 0.9))
    return ax
