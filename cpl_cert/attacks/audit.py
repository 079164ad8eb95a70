"""An attack run checked against the certificates of the same points, and its headline numbers.

``attack_dataset`` attacks a dataset's points with respect to ``certify``'s predictions, measuring distances
from the exact points the images stand for; ``summarize`` gives what ``cpl-cert attack`` prints and writes:
per radius the clean, certified and robust accuracy in each sense, the certified points an attack broke and
the violations, every violated certificate, and how tight the certificates are where the attack measured
each point's smallest adversarial distance. A library user gets the command's numbers from these two calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..certification import CertifyResult, fraction
from ..data import ImageDataset, to_float_images
from ..eps import EpsValue
from ..models import CPLNet
from ..progress import OnProgress
from ..radii import exact_points
from ..shards import Shards
from .check import Violation, find_violations, violations_at
from .ensemble import SuiteResult, run_suite
from .options import default_attack, measures_distance, passes_per_point


def attack_dataset(
    model: CPLNet,
    data: ImageDataset,
    cert: CertifyResult,
    eps: Sequence[EpsValue],
    attack: str | None = None,
    engine: str = "native",
    batch_size: int = 500,
    seed: int = 0,
    steps: int = 100,
    on_progress: OnProgress | None = None,
    shards: Shards | None = None,
) -> SuiteResult:
    """``run_suite`` on ``data``'s points (on the model's device) against the classes ``cert`` (``certify`` of the same
    points) found in each sense, distances measured from the float64 points the images stand for."""
    device = next(model.buffers()).device
    pixels = data.images.to(device)
    return run_suite(
        model, to_float_images(pixels), cert.predictions.to(device), [e.value for e in eps], attack, engine, batch_size, seed, steps,
        reference_float32=cert.predictions_float32.to(device), clean=exact_points(pixels), on_progress=on_progress,
        reference_any=cert.predictions_any.to(device), shards=shards,
    )


def estimate_seconds(
    model: CPLNet, data: ImageDataset, attack: str, engine: str, steps: int, radii: int, batch_size: int = 500
) -> float | None:
    """Up to how long ``attack_dataset`` may take on ``data`` (``None`` with the authors' code): the passes of a point
    no attack breaks (``passes_per_point``), each timed now as one forward and backward pass over a batch (after a
    small warm-up one); the model and the random state are left as they were."""
    passes = passes_per_point(attack, engine, steps, radii)
    if passes is None or len(data) == 0:
        return None
    device = next(model.buffers()).device
    x = to_float_images(data.images[: min(batch_size, len(data))].to(device)).requires_grad_(True)
    torch.autograd.grad(model(x[:8]).sum(), x)  # warm-up: the first pass pays one-time costs
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    torch.autograd.grad(model(x).sum(), x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / x.shape[0] * passes * len(data)


@dataclass
class AttackSummary:
    """The headline numbers of an attack run against the certificates of its points (``cpl-cert attack``'s table and JSON)."""

    rows: list[dict[str, Any]]
    """Per radius: clean, certified and robust accuracy in each sense, ``certified_but_broken`` and ``violations``."""
    violations: list[Violation]
    """Every point whose closest verified adversarial example beats its certified radius, in any sense."""
    tightness: dict[str, Any] | None
    """``tightness`` of the exact radii against the smallest adversarial distances (``None`` unless the attack measures them)."""

    @property
    def violated_points(self) -> list[int]:
        """The points with a violated certificate, each once (a point may violate several senses), in index order."""
        return sorted({v.index for v in self.violations})


def by_point(violations: Sequence[Violation]) -> dict[int, list[Violation]]:
    """The violations grouped by point (index order), each point's in the order found (exact, float32, any)."""
    grouped: dict[int, list[Violation]] = {}
    for v in sorted(violations, key=lambda v: v.index):
        grouped.setdefault(v.index, []).append(v)
    return grouped


def summarize(
    cert: CertifyResult, suite: SuiteResult, eps: Sequence[EpsValue], attack: str | None = None, engine: str = "native"
) -> AttackSummary:
    """The numbers ``cpl-cert attack`` reports for ``suite`` (``run_suite`` or ``attack_dataset`` with ``attack`` and
    ``engine``) on the points ``cert`` certified."""
    attack = attack or default_attack(engine)
    stats = tightness(cert.radii_exact, suite.min_distance) if measures_distance(attack, engine) else None
    return AttackSummary(accuracy_rows(cert, suite, eps), find_violations(suite, cert), stats)


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
                "robust_accuracy": fraction(robust),
                "certified_accuracy_float32": cert.certified_accuracy_float32(value.value),
                "robust_accuracy_float32": fraction(robust32),
                "certified_accuracy_any": cert.certified_accuracy_any(value.value),
                "robust_accuracy_any": fraction(robust_any),
                "certified_but_broken": int((certified & ~robust).sum()),
                "violations": int(violations_at(suite, e, cert).sum()),
            }
        )
    return rows


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
