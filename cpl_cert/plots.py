"""Plots (matplotlib, an optional extra: ``pip install 'cpl-cert[plot]'``), imported lazily, Agg backend."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write
from .errors import CplCertError

INSTALL_HINT = "--plot needs matplotlib, which is not installed; install it with: pip install 'cpl-cert[plot]'"


def require_matplotlib() -> None:
    """Fail with one sentence (before any work) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CplCertError(INSTALL_HINT)


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def certified_curve(correct: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, acc)``: certified accuracy ``mean(correct & radius > r)`` as a step function of ``r``.

    The points are the sorted radii of the correctly classified samples (the curve only drops there).
    """
    n = max(int(correct.numel()), 1)
    good = radii[correct].double().sort().values
    r = torch.cat([torch.zeros(1, dtype=torch.float64), good])
    # Just after good[i], the points with radius > r are those after i in sorted order.
    acc = torch.cat([torch.tensor([float((good > 0).sum())]), torch.arange(good.numel() - 1, -1, -1, dtype=torch.float64)]) / n
    return r, acc


def plot_certified_accuracy(
    path: str | os.PathLike[str],
    correct: torch.Tensor,
    radii: torch.Tensor,
    eps: list[tuple[float, str, float]],
    title: str,
) -> Path:
    """Write a PNG of certified accuracy against radius, marking each ``(eps, label, accuracy)``; atomic."""
    plt = _pyplot()
    r, acc = certified_curve(correct, radii)
    r_max = float(max([*(e[0] for e in eps), float(r[-1]) if r.numel() else 0.0])) * 1.05 or 1.0
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.step(torch.cat([r, torch.tensor([r_max])]).numpy(), torch.cat([acc, acc[-1:]]).numpy(), where="post", label="certified accuracy")
    for value, label, accuracy in eps:
        ax.plot([value], [accuracy], "o", color="C3")
        ax.annotate(f"{label}: {accuracy:.1%}", (value, accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlim(0, r_max)
    ax.set_ylim(0, 1)
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
