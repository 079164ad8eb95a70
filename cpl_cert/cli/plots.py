"""Plots of certify and attack (matplotlib, an optional extra: ``pip install 'cpl-cert[plot]'``), imported lazily, Agg backend."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CplCertError
from ..io import atomic_write

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
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | os.PathLike[str], dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG atomically, then release it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def plot_gap(path: str | os.PathLike[str], radii: torch.Tensor, distances: torch.Tensor, title: str) -> Path:
    """``cpl-cert attack --plot``. Left: per point (sorted by distance), radius r and smallest adversarial
    distance d. Right: d against r; a point below the diagonal would be a certificate violation."""
    plt = _pyplot()
    r = radii.double().cpu()
    d = distances.double().cpu()
    found = torch.isfinite(d)
    order = torch.argsort(torch.where(found, d, torch.full_like(d, float("inf"))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    positions = torch.arange(len(order))
    left.scatter(positions, d[order], s=6, label="smallest adversarial distance d", color="tab:red")
    left.scatter(positions, r[order], s=6, label="certified radius r", color="tab:blue")
    left.set_xlabel("point (sorted by d)")
    left.set_ylabel("l2 distance")
    left.legend(loc="upper left")
    if bool(found.any()):
        top = float(torch.maximum(d[found].max(), r[found].max()))
        right.scatter(r[found], d[found], s=6, color="tab:purple")
        right.plot([0, top], [0, top], color="black", linewidth=1, label="d = r (below: violation)")
        right.legend(loc="upper left")
    right.set_xlabel("certified radius r")
    right.set_ylabel("adversarial distance d")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path, dpi=120)
