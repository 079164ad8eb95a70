"""Reports of a certification run: the Rich summary table, the JSON report and the per-sample CSV (docs/certify.md)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from ..certify import CertifyResult
from ..io import atomic_write

CSV_HEADER = ("index", "label", "prediction", "margin", "radius")


def certify_table(result: CertifyResult, title: str) -> Table:
    """Clean and certified accuracies, the network's Lipschitz bound and the throughput."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("points", f"{result.n}")
    table.add_row("clean accuracy", f"{result.clean_accuracy:.2%}")
    for entry in result.certified:
        value = f"{entry['eps']:.4g}"
        shown = f"{entry['label']} ({value})" if "/" in entry["label"] else entry["label"]
        table.add_row(f"certified accuracy at eps = {shown}", f"{entry['accuracy']:.2%}")
    table.add_row("Lipschitz bound (certified upper)", f"{result.bounds.upper:.8g}")
    if result.bounds.lower is not None:
        table.add_row("Lipschitz lower bound (max ||J(x)||)", f"{result.bounds.lower:.6g}")
    table.add_row("median radius of correct points", _median_radius(result))
    table.add_row("re-checked in float64", f"{result.rechecked}")
    table.add_row("device", result.device)
    table.add_row("images / s", f"{result.images_per_second:,.0f}")
    return table


def _median_radius(result: CertifyResult) -> str:
    radii = result.radii[result.correct]
    return f"{float(radii.median()):.4g}" if radii.numel() else "-"


def certify_report(result: CertifyResult, **fields: Any) -> dict[str, Any]:
    """The ``certify --json`` report (docs/certify.md); ``fields`` (model, sha256, dataset, split...) come first."""
    return {
        **fields,
        "n": result.n,
        "lipschitz": result.bounds.to_dict(),
        "clean_accuracy": result.clean_accuracy,
        "certified": result.certified,
        "device": result.device,
        "seconds": result.seconds,
        "images_per_second": result.images_per_second,
        "rechecked_float64": result.rechecked,
        "float32_radius_error": result.extra.get("float32_radius_error"),
        "torch": torch.__version__,
    }


def write_radii_csv(path: str | os.PathLike[str], result: CertifyResult, indices: torch.Tensor | None = None) -> Path:
    """One row per point: ``index,label,prediction,margin,radius`` (float64 printed with repr precision); atomic."""
    index = indices if indices is not None else torch.arange(result.n)
    rows = zip(index.tolist(), result.labels.tolist(), result.predictions.tolist(), result.margins.tolist(), result.radii.tolist(), strict=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_HEADER)
            writer.writerows((i, y, p, repr(m), repr(r)) for i, y, p, m, r in rows)

    return atomic_write(path, write)
