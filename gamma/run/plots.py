"""Pictures people would rather see than read: Stage I curves and the allocation over depth."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gamma.model.loading import block_index  # noqa: E402


def plot_learning_curves(history: dict, path: str | Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, title in zip(axes, ("loss", "violation", "multiplier"),
                              ("block loss", "constraint violation E - B (bits)", "multiplier lambda")):
        ax.plot(history.get(key, []))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].axhline(0, color="k", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_allocation(assignment: dict[str, int], path: str | Path, title: str = "") -> Path:
    kinds = sorted({name.rsplit(".", 1)[-1] for name in assignment})
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for j, kind in enumerate(kinds):
        pts = sorted((block_index(n), b) for n, b in assignment.items() if n.endswith("." + kind))
        ax.scatter([p[0] + (j - len(kinds) / 2) * 0.1 for p in pts], [p[1] for p in pts], s=14, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("bits")
    ax.set_yticks(sorted(set(assignment.values())))
    ax.set_title(title or "bits per module over depth")
    ax.legend(ncol=len(kinds), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_pareto(rows: list[dict], path: str | Path, x: str = "avg_bits", y: str = "perplexity") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
