"""The Lipschitz bounds table (`cpl-cert lipschitz`): one row per stage, for people."""

from __future__ import annotations

import math

from ..lipschitz import LipschitzBounds
from .table import Table


def _fmt(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def lipschitz_table(bounds: LipschitzBounds, title: str = "Lipschitz bounds") -> Table:
    """One row per layer: step, power-iteration sigma, certified sigma, layer bound (for SLL layers: no single step,
    the sigmas of ``diag(sqrt t) W``, said in the caption)."""
    sll = any(row.kind.startswith("sll") for row in bounds.layers)
    caption = "SLL layers: step 2 t per unit (-), sigma = ||diag(sqrt t) W||, bound max(1, 2 sigma^2 - 1)" if sll else None
    table = Table(title=title, caption=caption)
    for column in ("layer", "kind", "step h", "sigma (power it.)", "sigma (upper)", "Lip bound"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for row in bounds.layers:
        style = "bold red" if row.bound > 1.0 + 1e-12 and row.kind.startswith(("cpl", "sll")) else None
        table.add_row(
            row.name, row.kind, _fmt(row.step), _fmt(row.sigma_power), _fmt(row.sigma_upper), _fmt(row.bound, 8), style=style
        )
    return table
