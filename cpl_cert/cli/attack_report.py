"""Summaries of an attack run for people (Rich tables) and programs (the ``attack --json`` report, docs/attack.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..attacks.check import Violation, violations_at
from ..attacks.ensemble import SuiteResult
from ..certification import CertifyResult, EpsValue
from .table import Table


def accuracy_rows(cert: CertifyResult, suite: SuiteResult, eps: Sequence[EpsValue]) -> list[dict[str, Any]]:
    """Per radius: clean, certified and robust accuracy in each sense and the number of violating points.

    Robust = correctly classified and no adversarial example within ``eps`` verified in the same sense
    (the exact function, cpl-cert's float32 network, plain float32). A certified point that an attack breaks
    in the same sense is a violation, so ``robust >= certified`` in each sense whenever there are none.
    """
    rows = []
    for e, value in enumerate(eps):
        robust = cert.correct & ~suite.broken(e)
        robust32 = cert.correct_float32 & ~suite.broken(e, "float32")
        robust_any = cert.correct_any & ~suite.broken(e, "any")
        certified = cert.correct & (cert.radii_exact > value.value)
        rows.append(
            {
                "eps": value.value,
                "label": value.label,
                "clean_accuracy": cert.clean_accuracy,
                "certified_accuracy": cert.certified_accuracy(value.value),
                "robust_accuracy": _fraction(robust),
                "certified_accuracy_float32": cert.certified_accuracy_float32(value.value),
                "robust_accuracy_float32": _fraction(robust32),
                "certified_accuracy_any": cert.certified_accuracy_any(value.value),
                "robust_accuracy_any": _fraction(robust_any),
                "certified_but_broken": int((certified & ~robust).sum()),
                "violations": int(violations_at(suite, e, cert).sum()),
            }
        )
    return rows


def _fraction(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else 0.0


def tightness(radii: torch.Tensor, distances: torch.Tensor) -> dict[str, Any]:
    """Distribution of ``radius / adversarial distance`` over points with both (1 = tight certificate)."""
    radii, distances = radii.double(), distances.double()
    usable = torch.isfinite(distances) & (distances > 0)
    ratio = radii[usable] / distances[usable]
    stats: dict[str, Any] = {"points": int(usable.sum()), "no_adversarial_found": int((~torch.isfinite(distances)).sum())}
    if ratio.numel():
        qs = torch.quantile(ratio, torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64))
        stats.update({k: float(v) for k, v in zip(("min", "p10", "p25", "median", "p75", "p90", "max"), qs, strict=True)})
        stats["mean"] = float(ratio.mean())
        stats["mean_gap"] = float((distances[usable] - radii[usable]).mean())
    return stats


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def accuracy_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    columns = ("eps", "clean", "certified", "robust", "certified (float32)", "robust (float32)", "certified (any)", "robust (any)", "violations")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        bad = row["violations"] > 0 or any(row[f"robust_accuracy{s}"] < row[f"certified_accuracy{s}"] for s in ("", "_float32", "_any"))
        table.add_row(
            f"{row['label']} ({row['eps']:.4g})" if "/" in row["label"] else row["label"],
            _pct(row["clean_accuracy"]),
            *(_pct(row[f"{kind}_accuracy{s}"]) for s in ("", "_float32", "_any") for kind in ("certified", "robust")),
            str(row["violations"]),
            style="bold red" if bad else None,
        )
    return table


def violations_table(violations: list[Violation], limit: int = 50) -> Table:
    table = Table(title=f"CERTIFICATE VIOLATIONS ({len(violations)} points)", title_style="bold red")
    for column in ("index", "sense", "certified radius r", "adversarial distance d", "d / r", "attack", "at eps"):
        table.add_column(column, justify="right")
    for v in violations[:limit]:
        ratio = f"{v.distance / v.radius:.4f}" if v.radius > 0 else "-"
        table.add_row(str(v.index), v.sense, f"{v.radius:.6g}", f"{v.distance:.6g}", ratio, v.attack, f"{v.eps:.4g}")
    if len(violations) > limit:
        table.caption = f"... and {len(violations) - limit} more (all are in the JSON report)"
    return table


def tightness_table(stats: dict[str, Any]) -> Table:
    table = Table(title="How tight are the certificates: certified radius / smallest adversarial distance")
    keys = ("points", "min", "p10", "p25", "median", "p75", "p90", "max", "mean")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_row(*[str(stats[k]) if k == "points" else (f"{stats[k]:.4f}" if k in stats else "-") for k in keys])
    return table


def json_report(
    *,
    model: str,
    sha256: str,
    dataset: str,
    cert: CertifyResult,
    suite: SuiteResult,
    rows: list[dict[str, Any]],
    violations: list[Violation],
    attack: str,
    engine: str,
    seconds: float,
    seed: int,
    assumed_lipschitz: float | None,
    stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """The ``attack --json`` report: accuracies, violations and settings, per-radius rows and violation details."""
    return {
        "model": model,
        "sha256": sha256,
        "dataset": dataset,
        "split": "test",
        "n": cert.n,
        "eps": [row["eps"] for row in rows],
        "eps_labels": [row["label"] for row in rows],
        "attacks": {"attack": attack, "engine": engine, "seed": seed, "components": suite.settings},
        "clean_accuracy": cert.clean_accuracy,
        "certified_accuracy": [row["certified_accuracy"] for row in rows],
        "robust_accuracy": [row["robust_accuracy"] for row in rows],
        "clean_accuracy_float32": cert.clean_accuracy_float32,
        "certified_accuracy_float32": [row["certified_accuracy_float32"] for row in rows],
        "robust_accuracy_float32": [row["robust_accuracy_float32"] for row in rows],
        "clean_accuracy_any": cert.clean_accuracy_any,
        "certified_accuracy_any": [row["certified_accuracy_any"] for row in rows],
        "robust_accuracy_any": [row["robust_accuracy_any"] for row in rows],
        "results": rows,
        "violations": [v.index for v in violations],
        "violation_details": [v.to_dict() for v in violations],
        "rejected_adversarial_examples": suite.rejected,
        "engine_warnings": suite.extra.get("engine_warnings", []),
        "lipschitz": {"upper": cert.bounds.upper, "body_upper": cert.bounds.body_upper, "assumed": assumed_lipschitz},
        "tightness": stats,
        "device": cert.device,
        "processes": cert.processes,
        "seconds": seconds,
    }
