"""Plots of certify and attack (matplotlib, an optional extra: ``pip install matplotlib``), imported lazily, Agg backend."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from ..certification import CertifyResult
from ..errors import CplCertError
from ..files import atomic_write
from .common import check_writable

INSTALL_HINT = (
    "--plot needs matplotlib, which is not installed; install it with pip install matplotlib (or pip install '.[plot]' in the cpl-cert folder)"
)


def require_matplotlib() -> None:
    """Fail with one sentence (before any work) when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise CplCertError(INSTALL_HINT)


def check_plot_path(path: Path | None) -> None:
    """Before any work: ``--plot`` names a writable ``.png`` file and matplotlib is there to draw it."""
    if path is None:
        return
    if path.suffix.lower() != ".png":
        raise CplCertError(f"--plot writes a PNG image: give it a name ending in .png, not {path}")
    check_writable(path)
    require_matplotlib()


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


def _curve_points(correct: torch.Tensor, radii: torch.Tensor, r_max: float) -> tuple[Any, Any]:
    """The step curve in percent, extended flat to ``r_max``."""
    r, acc = certified_curve(correct, radii)
    return torch.cat([r, torch.tensor([r_max], dtype=torch.float64)]).numpy(), (100 * torch.cat([acc, acc[-1:]])).numpy()


def _mark(ax: Any, value: float, label: str, accuracy: float, r_max: float) -> Any:
    """A point on the exact curve at ``value``, labelled inside the axes (left of the point near the right edge)."""
    ax.plot([value], [100 * accuracy], "o", color="C0", markersize=4)
    right_side = value < 0.7 * r_max
    return ax.annotate(
        f"{label}: {accuracy:.2%}", (value, 100 * accuracy), textcoords="offset points",
        xytext=(6 if right_side else -6, 6), ha="left" if right_side else "right", fontsize=8,
    )


def _separate(fig: Any, ax: Any, labels: list[Any]) -> None:
    """Move eps labels apart vertically, in eps order, until none overlaps another: close radii give close
    points on the curve. Each label goes down (the curve falls to the right) or, at the bottom, up."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Any] = []
    for label in labels:
        dx, dy = label.xyann
        step = label.get_window_extent(renderer).height * 72 / fig.dpi + 1
        for shift in [-k * step for k in range(len(labels) + 1)] + [k * step for k in range(1, len(labels) + 1)]:
            label.xyann = (dx, dy + shift)
            box = label.get_window_extent(renderer)
            if box.y0 >= frame.y0 and box.y1 <= frame.y1 and not any(box.overlaps(other) for other in placed):
                break
        placed.append(label.get_window_extent(renderer))


def plot_certified_accuracy(path: str | os.PathLike[str], result: CertifyResult, title: str) -> Path:
    """Certified accuracy against radius: the exact function of the weights (solid), cpl-cert's float32 network
    (dashed), every float32 runtime (dotted), clean accuracy at radius 0 and each eps marked; PNG, written atomically."""
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter

    eps = [(e["eps"], e["label"], e["accuracy"]) for e in result.certified]
    largest = float(result.radii_exact[result.correct].max()) if bool(result.correct.any()) else 0.0
    r_max = max([*(e[0] for e in eps), largest]) * 1.05 or 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.step(*_curve_points(result.correct, result.radii_exact, r_max), where="post", color="C0", label="exact function of the weights")
    ax.step(*_curve_points(result.correct_float32, result.radii_float32, r_max), where="post", color="C1", linestyle="--",
            label="float32, cpl-cert (float64 accumulation)")
    ax.step(*_curve_points(result.correct_any, result.radii_any, r_max), where="post", color="C2", linestyle=":",
            label="float32, any runtime")
    ax.plot([0], [100 * result.clean_accuracy], "s", color="black", markersize=5, clip_on=False,
            label=f"clean accuracy {result.clean_accuracy:.2%} (radius 0)")
    labels = [_mark(ax, value, label, accuracy, r_max) for value, label, accuracy in eps]
    ax.set_xlim(0, r_max)
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(100))
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _separate(fig, ax, labels)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | os.PathLike[str], dpi: int | None = None) -> Path:
    """Write ``fig`` as a PNG atomically, then release it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


def plot_gap(path: str | os.PathLike[str], radii: torch.Tensor, distances: torch.Tensor, title: str) -> Path:
    """``cpl-cert attack --plot``. Left: per point (sorted by distance), radius r and smallest adversarial
    distance d. Right: d against r at equal scales; a point below the diagonal would be a certificate violation."""
    plt = _pyplot()
    r, d = radii.double().cpu(), distances.double().cpu()
    found = torch.isfinite(d)
    order = torch.argsort(torch.where(found, d, torch.full_like(d, float("inf"))))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5.4), gridspec_kw={"width_ratios": [1.3, 1]})
    positions = torch.arange(len(order))
    shown = found[order]
    left.scatter(positions[shown], d[order][shown], s=6, label="smallest adversarial distance d", color="tab:red")
    left.scatter(positions, r[order], s=6, label="certified radius r", color="tab:blue")
    left.set_xlabel("point (sorted by d)")
    left.set_ylabel("l2 distance")
    left.legend(loc="upper left", fontsize=8)
    _gap_panel(right, r, d, found)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path, dpi=120)


def _gap_panel(ax: Any, r: torch.Tensor, d: torch.Tensor, found: torch.Tensor) -> None:
    """d against r, equal scales, x spanning the radii; the diagonal d = r is the certificate's limit."""
    from matplotlib.ticker import MaxNLocator

    r_top = float(r.max()) * 1.05 if r.numel() and float(r.max()) > 0 else 1.0
    d_top = max(float(d[found].max()) * 1.05, r_top) if bool(found.any()) else r_top
    missing = int((~found).sum())
    ax.scatter(r[found], d[found], s=6, color="tab:purple", label=f"points with an adversarial example ({int(found.sum())})")
    ax.plot([0, r_top], [0, r_top], color="black", linewidth=1, label="d = r (below: a violation)")
    ax.set_xlim(0, r_top)
    ax.set_ylim(0, d_top)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("certified radius r")
    ax.set_ylabel("smallest adversarial distance d")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    if missing:
        ax.plot([], [], " ", label=f"no adversarial example found: {missing}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8)
