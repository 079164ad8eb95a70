"""Running a named attack over a data set at several radii, the AutoAttack-style ensemble, and the check.

``--attack`` names: ``pgd`` (PGD-L2), ``apgd`` (APGD-CE then APGD-T on the points still unbroken),
``autoattack`` (worst case per point over APGD-CE, APGD-T, PGD-L2 and the FMN minimum-norm attack,
which plays the role of AutoAttack's FAB-T), ``minnorm`` (FMN-L2: each point's smallest adversarial
distance; a point is broken at ``eps`` when that distance is at most ``eps``).

Every point is attacked with respect to its clean *prediction*, so a success is exactly the event a
certificate rules out. Every adversarial example is re-verified in float64 before it counts
(``verify``): inside [0, 1], prediction of a float64 copy of the model really differs, distance in
float64. A certificate violation is a verified adversarial example at distance ``d < r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import CplCertError
from ..models import float64_copy
from .apgd import apgd_l2, apgd_targeted_l2
from .common import AttackOutcome, l2_norm
from .minnorm import fmn_l2
from .pgd import pgd_l2

ATTACKS = ("pgd", "apgd", "autoattack", "minnorm")
ENGINES = ("native", "torchattacks")


@dataclass
class SuiteResult:
    """Verified results of one attack run: per radius ``e`` and point ``i``.

    ``distance[e, i]``: float64 distance of the closest verified adversarial example found at radius
    ``eps[e]`` (``inf`` if none); ``source[e, i]``: index into ``names`` of the attack that found it
    (-1 if none). ``min_distance[i]``: the smallest verified distance over all radii and attacks.
    """

    eps: list[float]
    names: list[str]
    settings: dict[str, dict[str, Any]]
    distance: torch.Tensor
    source: torch.Tensor
    rejected: int = 0
    """Points with at least one candidate adversarial example that failed float64 re-verification."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def min_distance(self) -> torch.Tensor:
        return self.distance.min(dim=0).values if self.distance.numel() else self.distance

    def broken(self, e: int) -> torch.Tensor:
        """Points for which a verified adversarial example within ``eps[e]`` was found."""
        return self.distance[e] <= self.eps[e]

    def source_of(self, e: int, i: int) -> str:
        code = int(self.source[e, i])
        return self.names[code] if code >= 0 else ""


@torch.no_grad()
def verify(model64: nn.Module, x0: torch.Tensor, outcome: AttackOutcome, reference: torch.Tensor) -> torch.Tensor:
    """float64 distances of the adversarial examples that survive re-verification (``inf`` elsewhere).

    An example survives when it lies in [0, 1] and the float64 model's prediction differs from ``reference``.
    """
    result = torch.full((x0.shape[0],), math.inf, dtype=torch.float64, device=x0.device)
    idx = outcome.found.nonzero().flatten()
    if idx.numel() == 0:
        return result
    adv = outcome.adversarial[idx].double()
    inside = (adv.flatten(1).min(dim=1).values >= 0) & (adv.flatten(1).max(dim=1).values <= 1)
    changed = model64(adv).argmax(dim=1) != reference[idx]
    ok = inside & changed
    result[idx[ok]] = l2_norm(adv[ok] - x0[idx[ok]].double())
    return result


def _native(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, attack: str, generator: torch.Generator,
    minnorm: AttackOutcome | None,
    steps: int = 100,
) -> list[AttackOutcome]:
    """The native attacks of ``attack`` at radius ``eps``; each later one runs on the points still unbroken."""
    if attack == "minnorm":
        assert minnorm is not None
        return [minnorm]
    plan: list[Callable[[torch.Tensor, torch.Tensor], AttackOutcome]] = []
    if attack in ("apgd", "autoattack"):
        plan += [lambda a, b: apgd_l2(model, a, b, eps, steps=steps, generator=generator), lambda a, b: apgd_targeted_l2(model, a, b, eps, steps=steps, generator=generator)]
    if attack in ("pgd", "autoattack"):
        plan.append(lambda a, b: pgd_l2(model, a, b, eps, steps=steps, generator=generator))
    outcomes: list[AttackOutcome] = []
    alive = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    for run in plan:
        idx = alive.nonzero().flatten()
        if idx.numel() == 0:
            break
        part = run(x0[idx], y[idx])
        full = AttackOutcome(
            torch.zeros_like(alive), x0.clone(), torch.full((x0.shape[0],), math.inf, dtype=torch.float64, device=x0.device),
            part.name, part.settings,
        )
        full.found[idx], full.adversarial[idx], full.distance[idx] = part.found, part.adversarial, part.distance
        alive &= ~full.found
        outcomes.append(full)
    if attack == "autoattack" and minnorm is not None:
        outcomes.append(minnorm)
    return outcomes


def run_suite(
    model: nn.Module,
    images: torch.Tensor,
    reference: torch.Tensor,
    eps: Sequence[float],
    attack: str = "apgd",
    engine: str = "native",
    batch_size: int = 500,
    seed: int = 0,
    steps: int = 100,
    progress: Callable[[int, int], None] | None = None,
) -> SuiteResult:
    """Attack every point of ``images`` (floats in [0, 1], on the model's device) at every radius.

    ``reference`` is the prediction the attacks try to change (cpl-cert passes the clean predictions).
    ``steps`` is the iteration budget of PGD and APGD (reference: 100); FMN gets twice as many.
    """
    if attack not in ATTACKS:
        raise CplCertError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if engine not in ENGINES:
        raise CplCertError(f"unknown engine {engine!r}; choose native or torchattacks")
    if engine == "torchattacks":
        from .external import ENGINE_ATTACKS, require_torchattacks

        require_torchattacks()
        if attack not in ENGINE_ATTACKS:
            raise CplCertError(f"--engine torchattacks runs {', '.join(ENGINE_ATTACKS)}, not {attack}; use --engine native for {attack}")
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    model.eval()
    model64 = float64_copy(model)
    # Tensors made under torch.inference_mode (certify's predictions) cannot enter autograd: copy them.
    images, reference = images.detach().clone(), reference.detach().clone()
    device = images.device
    n = images.shape[0]
    distance = torch.full((len(eps), n), math.inf, dtype=torch.float64, device=device)
    source = torch.full((len(eps), n), -1, dtype=torch.long, device=device)
    names: list[str] = []
    settings: dict[str, dict[str, Any]] = {}
    rejected = torch.zeros(n, dtype=torch.bool)
    for begin in range(0, n, batch_size):
        x0 = images[begin : begin + batch_size].float()
        y = reference[begin : begin + batch_size].to(device)
        minnorm = fmn_l2(model, x0, y, steps=2 * steps, check_model=model64) if attack in ("minnorm", "autoattack") and engine == "native" else None
        for e, radius in enumerate(eps):
            if engine == "torchattacks":
                from .external import torchattacks_attack

                outcomes = torchattacks_attack(model, x0, y, radius, attack, seed)
            else:
                # A fresh stream per (batch, radius): the same points get the same random starts whatever
                # else runs, so the ensemble's APGD part reproduces --attack apgd exactly.
                generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + begin * 101 + e)
                outcomes = _native(model, x0, y, radius, attack, generator, minnorm, steps)
            for outcome in outcomes:
                if outcome.name not in names:
                    names.append(outcome.name)
                    settings[outcome.name] = outcome.settings
                d = verify(model64, x0, outcome, y)
                rejected[begin : begin + x0.shape[0]] |= (outcome.found & torch.isinf(d)).cpu()
                view = distance[e, begin : begin + x0.shape[0]]
                closer = d < view
                view[closer] = d[closer]
                source[e, begin : begin + x0.shape[0]][closer] = names.index(outcome.name)
        if progress is not None:
            progress(min(begin + batch_size, n), n)
    return SuiteResult(list(eps), names, settings, distance.cpu(), source.cpu(), int(rejected.sum()))


@dataclass
class Violation:
    """A verified adversarial example closer than the certified radius: the certificate is wrong."""

    index: int
    radius: float
    distance: float
    attack: str
    eps: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "radius": self.radius, "distance": self.distance, "attack": self.attack, "eps": self.eps}


def find_violations(result: SuiteResult, radii: torch.Tensor, indices: Sequence[int] | None = None) -> list[Violation]:
    """Every point with a verified adversarial example at distance ``d < r`` (its closest one is listed).

    ``indices`` maps positions to test-set indices (default: the positions themselves).
    """
    radii = radii.double().cpu()
    violations: list[Violation] = []
    if result.distance.numel() == 0:
        return violations
    best, where = result.distance.min(dim=0)
    for i in (best < radii).nonzero().flatten().tolist():
        e = int(where[i])
        violations.append(
            Violation(
                index=int(indices[i]) if indices is not None else i,
                radius=float(radii[i]),
                distance=float(best[i]),
                attack=result.source_of(e, i),
                eps=result.eps[e],
            )
        )
    return violations


def violations_at(result: SuiteResult, e: int, radii: torch.Tensor) -> torch.Tensor:
    """Mask of points whose adversarial example found at radius ``eps[e]`` is closer than their certified radius."""
    return result.distance[e] < radii.double().cpu()
