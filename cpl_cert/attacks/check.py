"""The certificate check: is an adversarial example real, and does it beat a certified radius?

An attack proposes inputs; a certificate is contradicted only by an input that provably changes the
prediction and lies provably closer than the radius. The three senses of docs/certify.md are checked:

* the exact function of the stored weights: the example's class is established by a float64
  evaluation with a rigorous rounding bound (``certify``'s own enclosure), so float rounding cannot
  manufacture a violation, and it is compared with ``radii_exact``;
* cpl-cert's float32 network (float32 activations, float64 accumulation; ``cpl_cert.passes``): the
  example's prediction is what that network outputs, compared with ``radii_float32``;
* every correctly rounded float32 runtime: the example's prediction is what PyTorch's own float32
  forward (one such runtime) outputs, compared with ``radii_any``.

Distances are measured in float64 from the exact clean point (uint8 pixels / 255 in float64), scaled so
that no square underflows, and a violation needs ``distance * (1 + 1e-12) < radius``: a relative slack,
so rounding of the distance cannot create one at any scale and a real one is found at every scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..certification import certificate_constants
from ..models import CPLNet, float64_copy
from ..passes import accumulated_logits
from ..radii import float32_prediction, float64_pass
from ..rounding import ErrorModel
from .common import AttackOutcome, l2_norm

DISTANCE_SLACK = 1e-12
"""Relative rounding allowance of a float64 distance (a few hundred operations, each off by 2^-53 at most)."""


@dataclass
class Checker:
    """What verification needs of a model: the float32 network, its float64 copy and rounding constants."""

    model: nn.Module
    model64: nn.Module
    constants: ErrorModel


def make_checker(model: CPLNet) -> Checker:
    """A checker for ``model`` (its certificate constants are the ones ``certify`` uses)."""
    _, constants = certificate_constants(model)
    return Checker(model, float64_copy(model), constants)


@torch.no_grad()
def verify_exact(
    checker: Checker, clean: torch.Tensor, outcome: AttackOutcome, reference: torch.Tensor, box: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """float64 distances of the examples whose class under the exact function is provably not
    ``reference`` (``inf`` elsewhere); examples must lie in the pixel box [0, 1]."""
    result = torch.full((clean.shape[0],), math.inf, dtype=torch.float64, device=clean.device)
    idx = outcome.found.nonzero().flatten()
    if idx.numel() == 0:
        return result
    adv = outcome.adversarial[idx].double()
    answers = float64_pass(checker.model64, checker.constants, adv, torch.full_like(idx, -1))
    certain = answers.finite & (answers.low > 0) & (answers.top != reference[idx])
    ok = _inside_box(adv, box) & certain
    result[idx[ok]] = distance(adv[ok], clean[idx[ok]])
    return result


@torch.no_grad()
def verify_float32(
    checker: Checker, clean: torch.Tensor, outcome: AttackOutcome, reference: torch.Tensor, box: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """float64 distances of the examples on which cpl-cert's float32 network does not predict ``reference``
    strictly (another class, a tie or non-finite logits); ``inf`` elsewhere."""
    result = torch.full((clean.shape[0],), math.inf, dtype=torch.float64, device=clean.device)
    idx = outcome.found.nonzero().flatten()
    if idx.numel() == 0:
        return result
    adv = outcome.adversarial[idx].float()
    prediction = float32_prediction(accumulated_logits(checker.model, checker.model64, adv))  # -1 (a tie) breaks it too
    changed = prediction != reference[idx]
    ok = _inside_box(adv, box) & changed
    result[idx[ok]] = distance(adv[ok].double(), clean[idx[ok]])
    return result


def distance(points: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 l2 distance (scale-safe: ``l2_norm``)."""
    return l2_norm(points.double() - clean.double())


@torch.no_grad()
def verify_any(
    model: nn.Module, clean: torch.Tensor, outcome: AttackOutcome, reference: torch.Tensor, box: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """float64 distances of the examples on which PyTorch's own float32 forward (``model(x)``, one of the
    correctly rounded float32 runtimes ``radii_any`` covers) does not predict ``reference`` strictly."""
    result = torch.full((clean.shape[0],), math.inf, dtype=torch.float64, device=clean.device)
    idx = outcome.found.nonzero().flatten()
    if idx.numel() == 0:
        return result
    adv = outcome.adversarial[idx].float()
    changed = float32_prediction(model(adv)) != reference[idx]
    ok = _inside_box(adv, box) & changed
    result[idx[ok]] = distance(adv[ok].double(), clean[idx[ok]])
    return result


def _inside_box(x: torch.Tensor, box: tuple[float, float]) -> torch.Tensor:
    """Examples must be valid inputs: every value within ``box`` (the pixel range, [0, 1] by default)."""
    flat = x.flatten(1)
    return (flat.min(dim=1).values >= box[0]) & (flat.max(dim=1).values <= box[1])


@dataclass
class Violation:
    """A verified adversarial example closer than a certified radius: the certificate is wrong."""

    index: int
    radius: float
    distance: float
    attack: str
    eps: float
    sense: str = "exact"  # "exact" (the exact function), "float32" (cpl-cert's float32 network) or "any" (plain float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "radius": self.radius, "distance": self.distance,
            "attack": self.attack, "eps": self.eps, "sense": self.sense,
        }


def beats(distance: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Where a verified distance is provably below the radius."""
    return distance * (1.0 + DISTANCE_SLACK) < radius.double().to(distance.device)


def find_violations(suite: Any, cert: Any, indices: list[int] | None = None) -> list[Violation]:
    """Every point whose closest verified adversarial example beats its radius, in any sense.

    ``suite`` is a ``SuiteResult`` and ``cert`` the ``CertifyResult`` of the same points; ``indices``
    maps positions to test-set indices (default: the positions themselves).
    """
    violations: list[Violation] = []
    if suite.distance.numel() == 0:
        return violations
    for sense, distance in suite.distances.items():
        radii = certified_radii(cert, sense)
        best, where = distance.min(dim=0)
        for i in beats(best, radii).nonzero().flatten().tolist():
            e = int(where[i])
            violations.append(
                Violation(
                    index=int(indices[i]) if indices is not None else i, radius=float(radii[i]), distance=float(best[i]),
                    attack=suite.source_of(e, i, sense), eps=suite.eps[e], sense=sense,
                )
            )
    return violations


def violations_at(suite: Any, e: int, cert: Any) -> torch.Tensor:
    """Mask of points whose adversarial example found at radius ``eps[e]`` beats their radius, in any sense."""
    masks = [beats(distance[e], certified_radii(cert, sense)) for sense, distance in suite.distances.items()]
    return torch.stack(masks).any(dim=0)


def certified_radii(cert: Any, sense: str) -> torch.Tensor:
    """The certify result's radii of one sense: ``radii_exact``, ``radii_float32`` or ``radii_any``."""
    return getattr(cert, f"radii_{sense}")
