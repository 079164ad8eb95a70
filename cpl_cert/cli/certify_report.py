"""Reports of a certification run: the Rich summary table, the JSON report and the per-sample CSV (docs/certify.md)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..certification import CertifyResult
from ..files import atomic_write
from .table import Table

CSV_HEADER = (
    "index", "label", "prediction", "prediction_float32", "prediction_any", "margin", "radius", "radius_exact", "radius_float32",
    "radius_any",
)
SENSES = {
    "exact": "the exact function of the stored weights",
    "float32": "cpl-cert's float32 network: float32 activations, every dot product accumulated in float64 (cpl-cert predict)",
    "any": "every float32 runtime that rounds each operation correctly and sums in any order (PyTorch, ONNX Runtime)",
}
"""What each column of the reports is about (docs/certify.md)."""


def certify_table(result: CertifyResult, title: str) -> Table:
    """Clean and certified accuracies in the three senses, the network's Lipschitz bound and the throughput."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("exact weights", justify="right")
    table.add_column("float32 (cpl-cert)", justify="right")
    table.add_column("float32 (any runtime)", justify="right")
    table.add_row("points", f"{result.n}", "", "")
    table.add_row("clean accuracy", *(f"{v:.2%}" for v in (result.clean_accuracy, result.clean_accuracy_float32, result.clean_accuracy_any)))
    for entry in result.certified:
        value = f"{entry['eps']:.4g}"
        shown = f"{entry['label']} ({value})" if "/" in entry["label"] else entry["label"]
        table.add_row(f"certified accuracy at eps = {shown}", *(f"{entry[k]:.2%}" for k in ("accuracy", "accuracy_float32", "accuracy_any")))
    table.add_row("Lipschitz bound (certified upper)", f"{result.bounds.upper:.8g}", "", "")
    if result.bounds.lower is not None:
        table.add_row("Lipschitz lower bound (max ||J(x)||)", f"{result.bounds.lower:.6g}", "", "")
    table.add_row("median radius of correct points", *(_radius(result.median_radius(sense)) for sense in ("exact", "float32", "any")))
    table.add_row("re-evaluated in float64", f"{result.rechecked}", "", "")
    if result.undecided or result.nonfinite:
        table.add_row("undecided / non-finite", f"{result.undecided} / {result.nonfinite}", "", "")
    table.add_row("device", result.device + (f" (rank 0 of {result.processes} processes, torchrun)" if result.processes > 1 else ""), "", "")
    table.add_row("images / s", f"{result.images_per_second:,.0f}", "", "")
    return table


def _radius(value: float | None) -> str:
    return f"{value:.4g}" if value is not None else "-"


@dataclass
class LowerBound:
    """The empirical Lipschitz lower bound of a certify run: its value, and whether it was ``computed``, ``skipped`` or ``interrupted``."""

    value: float | None
    status: str


def json_report(result: CertifyResult, fields: dict[str, Any], lower: LowerBound, batch_size: int) -> dict[str, Any]:
    """The ``certify --json`` report (docs/certify.md); ``fields`` (model, sha256, dataset, split) come first."""
    bounds = replace(result.bounds, lower=lower.value)
    return {
        **fields,
        "n": result.n,
        "lipschitz": {**bounds.to_dict(), "one_lipschitz": bounds.upper <= 1.0, "lower_status": lower.status},
        "clean_accuracy": result.clean_accuracy,
        "clean_accuracy_float32": result.clean_accuracy_float32,
        "clean_accuracy_any": result.clean_accuracy_any,
        "certified": result.certified,
        "senses": {"accuracy": SENSES["exact"], "accuracy_float32": SENSES["float32"], "accuracy_any": SENSES["any"]},
        "device": result.device,
        "processes": result.processes,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "rechecked_float64": result.rechecked,
        "undecided": result.undecided,
        "nonfinite": result.nonfinite,
        "torch": torch.__version__,
        "batch_size": batch_size,
    }


def write_radii_csv(path: str | os.PathLike[str], result: CertifyResult, indices: torch.Tensor | None = None) -> Path:
    """One row per point (``CSV_HEADER``; float64 printed with repr precision), written atomically.

    ``radius`` holds for both the exact function and cpl-cert's float32 network; ``radius_exact``,
    ``radius_float32`` and ``radius_any`` for each sense alone. A prediction of -1 means no class is
    certain (a tie) or, for ``prediction_any``, not proven for every runtime.
    """
    index = indices if indices is not None else torch.arange(result.n)
    classes = (result.labels, result.predictions, result.predictions_float32, result.predictions_any)
    reals = (result.margins, result.radii, result.radii_exact, result.radii_float32, result.radii_any)
    rows = zip(index.tolist(), *(c.tolist() for c in classes), *(c.tolist() for c in reals), strict=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows((*row[:5], *(repr(v) for v in row[5:])) for row in rows)

    return atomic_write(path, write)
