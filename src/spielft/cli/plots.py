"""Pictures of a run: loss curves, and where the sparse deltas went."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from ..model import SpielModel


def plot_loss_curves(log_history: list[dict], path: Path, title: str = "") -> None:
    """Training and held-out loss against the optimizer step."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if held_out:
        ax.plot(*zip(*held_out, strict=True), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per completion token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def delta_magnitudes(model: SpielModel) -> tuple[dict[int, float], dict[str, float]]:
    """Mean |delta| by layer index and by matrix type: where training moved the weights most.

    (Each matrix's *number* of deltas is fixed by its size; how far they moved is what
    training decided.)
    """
    sums: dict[str, Counter] = {"layer": Counter(), "type": Counter()}
    counts: dict[str, Counter] = {"layer": Counter(), "type": Counter()}
    for name, delta in model.sparse_deltas().items():
        values = delta.values.detach().float().abs()
        match = re.search(r"\.(\d+)\.", name)
        for kind, key in (("layer", int(match.group(1)) if match else -1), ("type", name.rsplit(".", 1)[-1])):
            sums[kind][key] += float(values.sum())
            counts[kind][key] += values.numel()
    layer, kind = ({k: sums[g][k] / max(counts[g][k], 1) for k in sorted(sums[g])} for g in ("layer", "type"))
    return layer, kind


def plot_delta_distribution(model: SpielModel, path: Path) -> None:
    """Two bar charts: mean |delta| per layer and per matrix type (q, k, v, o, gate, ...)."""
    by_layer, by_type = delta_magnitudes(model)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120,
                                      gridspec_kw={"width_ratios": [2, 1]})
    left.bar([str(k) for k in by_layer], list(by_layer.values()), color="tab:green")
    left.set_xlabel("layer")
    left.set_ylabel("mean |delta|")
    left.tick_params(axis="x", labelsize=7)
    right.bar(list(by_type), list(by_type.values()), color="tab:purple")
    right.set_xlabel("matrix")
    right.tick_params(axis="x", rotation=45)
    fig.suptitle("Where training moved the weights: mean |delta| of the trained sparse deltas")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
