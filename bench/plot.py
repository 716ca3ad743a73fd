"""Charts of the bench results; also merges the JSON files of several runs into one chart.

  python bench/plot.py train bench/results/train_gpu.json bench/results/train_gpu_liger.json \
--out docs/bench_train_gpu.png
  python bench/plot.py serve bench/results/serve_gpu.json --out docs/bench_serve_gpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_train(results: list[dict], title: str, path: str | Path) -> None:
    """Tokens/s and peak memory per run, as horizontal bars (MFU written on the bars on GPU)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 0.42 * len(results) + 1.3))
    names = [r["run"] for r in results][::-1]
    bars = a.barh(names, [r["tokens_per_s"] for r in results][::-1], color="tab:blue")
    for bar, r in zip(bars, results[::-1]):
        if r.get("mfu") is not None:
            a.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {100 * r['mfu']:.1f}% MFU",
                   va="center", fontsize=7)
    a.set_xlabel("tokens/s (non-padding)")
    a.margins(x=0.25)
    a.xaxis.set_major_locator(plt.MaxNLocator(4))
    b.barh(names, [r["peak_memory_gb"] for r in results][::-1], color="tab:orange")
    b.set_xlabel("peak memory (GiB)")
    b.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_serve(levels: list[dict], title: str, path: str | Path) -> None:
    """Output tokens/s against concurrency, one line per server."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for server in dict.fromkeys(lv["server"] for lv in levels):
        points = [(lv["concurrency"], lv["tokens_per_s"]) for lv in levels if lv["server"] == server]
        ax.plot(*zip(*points), "o-", label=server)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["train", "serve"])
    parser.add_argument("files", nargs="+", help="JSON files written by --out")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    reports = [json.loads(Path(f).read_text()) for f in args.files]
    title = args.title or reports[0].get("model", "")
    if args.kind == "train":
        plot_train([r for rep in reports for r in rep["results"]], title, args.out)
    else:
        plot_serve([lv for rep in reports for lv in rep["levels"]], title, args.out)
