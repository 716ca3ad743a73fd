"""Low rank (低秩) in numpy: the ideas behind LoRA, small enough to read and run on a laptop.

Notation follows the LoRA paper (Hu et al. 2021, arXiv:2106.09685): a frozen weight W is d x k
(out x in), the update is B @ A with B d x r and A r x k, scaled by alpha / r:

    h = W x + (alpha / r) * B A x          (forward)
    W' = W + (alpha / r) * B A             (merge, after training)

B starts at zero, so before training the adapted layer computes exactly W x.
"""

from __future__ import annotations

import numpy as np


def low_rank_approx(M: np.ndarray, r: int) -> np.ndarray:
    """The best rank-r approximation of M (Eckart-Young): keep the r largest singular values."""
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def relative_error(M: np.ndarray, approx: np.ndarray) -> float:
    """||M - approx||_F / ||M||_F."""
    return float(np.linalg.norm(M - approx) / np.linalg.norm(M))


def errors_vs_rank(M: np.ndarray, ranks) -> list[float]:
    """Relative Frobenius error of the rank-r SVD approximation, for each r in ranks."""
    s = np.linalg.svd(M, compute_uv=False)
    total = np.sum(s**2)
    # Eckart-Young: the squared error of the best rank-r approximation is the sum of the
    # squared singular values that were dropped.
    return [float(np.sqrt(max(np.sum(s[r:] ** 2), 0.0) / total)) for r in ranks]


def lora_param_count(d: int, k: int, r: int) -> int:
    """Numbers in B (d x r) and A (r x k): r * (d + k), versus d * k for the full update."""
    return r * (d + k)


def init_lora(d: int, k: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) as in the paper: A random Gaussian (r x k), B zeros (d x r)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((r, k)) / np.sqrt(k)
    B = np.zeros((d, r))
    return A, B


def lora_forward(W: np.ndarray, A: np.ndarray, B: np.ndarray, x: np.ndarray,
                 alpha: float, r: int) -> np.ndarray:
    """W x + (alpha / r) * B (A x); x is a vector (k,) or a batch of columns (k, n)."""
    return W @ x + (alpha / r) * (B @ (A @ x))


def merge(W: np.ndarray, A: np.ndarray, B: np.ndarray, alpha: float, r: int) -> np.ndarray:
    """W + (alpha / r) * B A: one ordinary matrix that computes the same as lora_forward."""
    return W + (alpha / r) * (B @ A)


def make_update(d: int = 100, k: int = 100, rank: int = 6, noise: float = 0.02,
                seed: int = 0) -> np.ndarray:
    """A synthetic 'weight update' that is close to low rank: a few smooth rank-1 patterns
    with decaying strength (1, 1/2, 1/3, ...) plus a little Gaussian noise.

    Each pattern is an outer product of two smooth bumps, so the matrix is easy to look at;
    `noise` is the noise's Frobenius norm relative to the signal's (0 gives exact rank `rank`).
    """
    rng = np.random.default_rng(seed)

    def bumps(n):
        t = np.linspace(0, 1, n)[:, None]
        centers, widths = rng.uniform(0.1, 0.9, rank), rng.uniform(0.05, 0.2, rank)
        signs = rng.choice([-1.0, 1.0], rank)
        return signs * np.exp(-((t - centers) ** 2) / (2 * widths**2))

    U, V = bumps(d), bumps(k)
    strength = 1.0 / np.arange(1, rank + 1)
    signal = (U * strength) @ V.T
    signal /= np.linalg.norm(signal)
    N = rng.standard_normal((d, k))
    return signal + noise * N / np.linalg.norm(N)


def low_rank_target(d: int = 100, k: int = 100, true_rank: int = 4, seed: int = 0) -> np.ndarray:
    """A d x k matrix of exact rank `true_rank`, singular values evenly from 1 down to 0.5."""
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((d, true_rank)))
    V, _ = np.linalg.qr(rng.standard_normal((k, true_rank)))
    s = np.linspace(1.0, 0.5, true_rank)
    return (U * s) @ V.T


def fit_low_rank(target: np.ndarray, r: int, steps: int = 300, lr: float = 0.5,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Learn B (d x r) and A (r x k) so that B @ A matches `target`, by plain gradient descent
    on 0.5 * ||B A - target||_F^2, starting like LoRA (B = 0, A random).

    Returns (B, A, losses) where losses[i] = ||B A - target||_F^2 / ||target||_F^2 before step i.
    With r >= rank(target) the loss goes to ~0; with r < rank(target) it stops at the energy of
    the dropped singular values, exactly what the truncated SVD leaves (Eckart-Young).
    The defaults suit targets whose largest singular value is about 1 (see `low_rank_target`).
    """
    d, k = target.shape
    A, B = init_lora(d, k, r, seed)
    norm2 = np.sum(target**2)
    losses = np.empty(steps)
    for i in range(steps):
        E = B @ A - target
        losses[i] = np.sum(E**2) / norm2
        grad_B, grad_A = E @ A.T, B.T @ E
        B -= lr * grad_B
        A -= lr * grad_A
    return B, A, losses


def plot_approximation(M: np.ndarray, r: int, axes=None):
    """Four panels: M, its rank-r approximation with its parameter count r * (d + k), the error
    left over (relative Frobenius), and the singular values with the kept ones in red."""
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(8, 2.3), gridspec_kw={"width_ratios": [1, 1, 1, 1.2]})
    else:
        fig = axes[0].figure
    d, k = M.shape
    Mr = low_rank_approx(M, r)
    lim = np.abs(M).max()
    cmap = plt.get_cmap("RdBu_r", 32)  # 32 colour levels keep the saved PNG small
    titles = [f"ΔW: {d * k:,} numbers", f"rank-{r} B@A: {lora_param_count(d, k, r):,}",
              f"error: {relative_error(M, Mr):.1%}"]
    for ax, img, title in zip(axes, [M, Mr, M - Mr], titles):
        ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    s = np.linalg.svd(M, compute_uv=False)
    ax = axes[3]
    ax.semilogy(np.arange(1, len(s) + 1), s, ".", ms=3, color="gray")
    ax.semilogy(np.arange(1, r + 1), s[:r], ".", ms=4, color="C3")
    ax.axvline(r + 0.5, color="C3", lw=1)
    ax.set_title(f"singular values, top {r} kept", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_loss_curves(curves: dict, ax=None):
    """Loss (log scale) against step for each rank in curves = {r: losses}."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    for r, losses in curves.items():
        ax.semilogy(np.maximum(losses, 1e-12), label=f"r={r}")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("relative loss")
    ax.legend(fontsize=8, ncol=2)
    return ax


def adapter_update(adapter_dir, layer: int = 0, module: str = "q_proj") -> np.ndarray:
    """The update (alpha / r) * B @ A that a trained peft LoRA adapter adds to one weight, read
    from ``adapter_model.safetensors`` and ``adapter_config.json`` (d x k, like the weight)."""
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    from .errors import ConchError

    folder = Path(adapter_dir)
    if not (folder / "adapter_model.safetensors").exists():
        raise ConchError(f"{folder} holds no adapter_model.safetensors; train an adapter first (notebook 04).")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    prefix = f".layers.{layer}."
    found = {k for k in weights if prefix in k and f".{module}.lora_" in k}
    a = next((k for k in found if k.endswith("lora_A.weight")), None)
    b = next((k for k in found if k.endswith("lora_B.weight")), None)
    if a is None or b is None:
        raise ConchError(f"{folder} has no LoRA weights for layer {layer} {module}; "
                         f"its target modules are {config.get('target_modules')}.")
    scaling = config["lora_alpha"] / config["r"]
    return scaling * weights[b].astype(np.float64) @ weights[a].astype(np.float64)
