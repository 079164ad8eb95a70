"""The gap plot of ``cpl-cert attack --plot``: certified radius and smallest adversarial distance per point.

matplotlib is an optional extra (``pip install 'cpl-cert[plot]'``), imported only when a plot is asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .errors import CplCertError


def require_matplotlib() -> None:
    """Fail with one sentence when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CplCertError("--plot needs matplotlib; install it with `pip install 'cpl-cert[plot]'`") from None


def plot_gap(path: str | os.PathLike[str], radii: torch.Tensor, distances: torch.Tensor, title: str) -> Path:
    """Left: per point (sorted by distance), radius r and adversarial distance d. Right: d against r."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
