"""An attack run for people (Rich tables) and programs (the ``attack --json`` report, docs/attack.md); the numbers come from
``cpl_cert.attacks.audit``."""

from __future__ import annotations

from typing import Any

from ..attacks.audit import AttackSummary, by_point
from ..attacks.check import Violation
from ..attacks.ensemble import SuiteResult
from ..certification import CertifyResult
from .table import Table


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
    """One row per violated point: the senses it violates, and the radius, distance and attack of the first of them."""
    points = by_point(violations)
    table = Table(title=f"CERTIFICATE VIOLATIONS ({len(points)} points)", title_style="bold red")
    for column in ("index", "sense", "certified radius r", "adversarial distance d", "d / r", "attack", "at eps"):
        table.add_column(column, justify="right")
    for index, found in list(points.items())[:limit]:
        v = found[0]
        ratio = f"{v.distance / v.radius:.4f}" if v.radius > 0 else "-"
        senses = ", ".join(f.sense for f in found)
        table.add_row(str(index), senses, f"{v.radius:.6g}", f"{v.distance:.6g}", ratio, v.attack, f"{v.eps:.4g}")
    if len(points) > limit:
        table.caption = f"... and {len(points) - limit} more points (all are in the JSON report)"
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
    summary: AttackSummary,
    attack: str,
    engine: str,
    seconds: float,
    seed: int,
    assumed_lipschitz: float | None,
) -> dict[str, Any]:
    """The ``attack --json`` report: accuracies, violations and settings, per-radius rows and violation details."""
    rows = summary.rows
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
        "violations": summary.violated_points,
        "violation_details": [v.to_dict() for v in summary.violations],
        "rejected_adversarial_examples": suite.rejected,
        "engine_warnings": suite.extra.get("engine_warnings", []),
        "lipschitz": {"upper": cert.bounds.upper, "body_upper": cert.bounds.body_upper, "assumed": assumed_lipschitz},
        "tightness": summary.tightness,
        "device": cert.device,
        "processes": cert.processes,
        "seconds": seconds,
    }
