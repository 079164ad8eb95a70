"""Running a named attack over a data set at several radii, the AutoAttack-style ensemble, and the check.

``--attack`` names with the native engine: ``pgd`` (PGD-L2), ``apgd`` (APGD-CE then APGD-T on the
points still unbroken), ``autoattack`` (worst case per point over APGD-CE, APGD-T, PGD-L2 and the FMN
minimum-norm attack, which plays the role of AutoAttack's FAB-T), ``minnorm`` (FMN-L2: each point's
smallest adversarial distance; a point is broken at ``eps`` when that distance is at most ``eps``).
With ``engine="autoattack"`` Croce & Hein's own code runs instead (``cpl_cert.attacks.authors``):
``autoattack`` (their standard version: APGD-CE, APGD-T, FAB-T, Square), ``apgd``, ``fab`` or ``square``.

Every point is attacked with respect to its clean *prediction*, so a success is exactly the event a
certificate rules out. Every adversarial example is verified before it counts, for the exact function
and for the float32 network (``cpl_cert.attacks.check``); a certificate violation is a verified
example provably closer than the radius of the same sense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..numerics import strict_math
from ..progress import OnProgress, no_progress
from ..shards import Shards
from .apgd import apgd_l2, apgd_targeted_l2
from .check import Checker, make_checker, verify_any, verify_exact, verify_float32
from .common import AttackOutcome, attack_unbroken
from .minnorm import fmn_l2
from .options import ATTACK_PLANS, check_attack_options, default_attack, measures_distance
from .pgd import pgd_l2

SENSES = ("exact", "float32", "any")
"""The certificates an attack is checked against (docs/certify.md): the exact function of the weights,
cpl-cert's float32 network, and PyTorch's plain float32 forward as one of the runtimes ``radii_any`` covers."""


@dataclass
class SuiteResult:
    """Verified results of one attack run: per sense, radius ``e`` and point ``i``.

    ``distances[sense][e, i]``: float64 distance of the closest adversarial example found at radius
    ``eps[e]`` whose class provably differs in that sense (``inf`` if none); ``sources[sense][e, i]``: index
    into ``names`` of the attack that found it (-1 if none). ``distance``, ``distance_float32`` and
    ``distance_any`` (and ``source...``) name the three senses' tables.
    """

    eps: list[float]
    names: list[str]
    settings: dict[str, dict[str, Any]]
    distances: dict[str, torch.Tensor]
    sources: dict[str, torch.Tensor]
    rejected: int = 0
    """Points with a candidate adversarial example that changes the class in no sense (discarded)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, eps: list[float], n: int, device: torch.device) -> SuiteResult:
        shape = (len(eps), n)
        distances = {s: torch.full(shape, math.inf, dtype=torch.float64, device=device) for s in SENSES}
        return cls(eps, [], {}, distances, {s: torch.full(shape, -1, dtype=torch.long, device=device) for s in SENSES})

    @property
    def distance(self) -> torch.Tensor:
        return self.distances["exact"]

    @property
    def distance_float32(self) -> torch.Tensor:
        return self.distances["float32"]

    @property
    def distance_any(self) -> torch.Tensor:
        return self.distances["any"]

    def record(self, e: int, part: slice, outcome: AttackOutcome, verified: dict[str, torch.Tensor]) -> None:
        """Keep, per point of ``part`` and sense, the closer of the stored and the new verified example."""
        if outcome.name not in self.names:
            self.names.append(outcome.name)
            self.settings[outcome.name] = outcome.settings
        code = self.names.index(outcome.name)
        for sense, new in verified.items():
            distance, source = self.distances[sense], self.sources[sense]
            closer = new < distance[e, part]
            distance[e, part] = torch.where(closer, new, distance[e, part])
            source[e, part] = torch.where(closer, torch.full_like(source[e, part], code), source[e, part])

    def note(self, messages: list[str]) -> None:
        """Keep, once each, warnings an engine's own checks raised (``extra["engine_warnings"]``)."""
        kept = self.extra.setdefault("engine_warnings", [])
        kept.extend(m for m in messages if m not in kept)

    def to_cpu(self) -> SuiteResult:
        self.distances = {s: t.cpu() for s, t in self.distances.items()}
        self.sources = {s: t.cpu() for s, t in self.sources.items()}
        return self

    @property
    def min_distance(self) -> torch.Tensor:
        """Per point, the smallest distance at which the exact function's class provably changed."""
        return self.distance.min(dim=0).values if self.distance.numel() else self.distance

    def broken(self, e: int, sense: str = "exact") -> torch.Tensor:
        """Points with an adversarial example within ``eps[e]`` verified in ``sense`` (one of ``SENSES``)."""
        return self.distances[sense][e] <= self.eps[e]

    def source_of(self, e: int, i: int, sense: str = "exact") -> str:
        code = int(self.sources[sense][e, i])
        return self.names[code] if code >= 0 else ""


NATIVE_RUNS = {"apgd-ce": apgd_l2, "apgd-t": apgd_targeted_l2, "pgd": pgd_l2}
"""cpl-cert's fixed-eps attacks by the names ``AttackPlan.native`` lists."""


@dataclass(frozen=True)
class SuiteWork:
    """How ``run_suite``'s progress divides each batch: FMN's share first (where it runs), then one equal share per
    radius (each attack run a unit, FMN two, the authors' components their ``COST``)."""

    fmn: float
    per_radius: float
    radii: int
    n: int
    batch_size: int
    first: str = ""
    """The attack that runs first at each radius (its stage starts a radius; the others continue one)."""

    @classmethod
    def of(cls, attack: str, engine: str, radii: int, n: int, batch_size: int) -> SuiteWork:
        plan = ATTACK_PLANS[attack]
        if engine == "native":
            phases = plan.native or ()
            per_radius = float(len(phases))
        else:
            from .authors import COST

            phases = plan.authors or ()
            per_radius = sum(COST[name] for name in phases)
        fmn = 2.0 if measures_distance(attack, engine) else 0.0
        return cls(fmn, per_radius, radii, n, max(batch_size, 1), phases[0] if phases else "")

    @property
    def units(self) -> float:
        """Shares of one batch (1 when there is nothing to do)."""
        return self.fmn + self.radii * self.per_radius or 1.0

    def points_done(self, done: float, stage: str) -> float:
        """From a report of ``run_suite`` (``stage``, ``done`` points, fractional inside a batch): the points that
        ``stage``'s radius (or FMN) has finished, the earlier batches' included. A report at the border of two radii
        belongs to the later one when ``stage`` starts it, else to the earlier one."""
        start = min(int(done // self.batch_size) * self.batch_size, max(self.n - 1, 0) // self.batch_size * self.batch_size)
        size = min(self.batch_size, self.n - start)
        if size <= 0 or done >= start + size:
            return float(min(done, self.n))
        units = (done - start) / size * self.units
        if stage == "fmn" or self.per_radius == 0:
            share = units / self.fmn if self.fmn else 1.0
        else:
            past = (units - self.fmn) / self.per_radius
            radius = math.floor(past) if stage.startswith(f"{self.first} ") else math.ceil(past) - 1
            share = past - min(max(radius, 0), self.radii - 1)
        return start + min(max(share, 0.0), 1.0) * size


class _BatchProgress:
    """Reports a batch's progress in points: each attack run at each radius is an equal share, FMN two."""

    def __init__(self, on_progress: OnProgress, part: slice, n: int, attack: str, engine: str, radii: int) -> None:
        self.on_progress, self.part, self.n, self.done = on_progress, part, n, 0.0
        self.total = SuiteWork.of(attack, engine, radii, n, part.stop - part.start).units

    def phase(self, stage: str, weight: float = 1.0) -> Callable[[float], None]:
        """``on_step`` for the next phase (``weight`` shares): reports ``stage`` and the points' progress."""
        begin = self.done
        self.done += weight

        def on_step(fraction: float) -> None:
            share = (begin + weight * min(max(fraction, 0.0), 1.0)) / self.total
            self.on_progress(stage, self.part.start + share * (self.part.stop - self.part.start), self.n)

        on_step(0.0)
        return on_step


def _native(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, attack: str, generator: torch.Generator,
    minnorm: AttackOutcome | None,
    steps: int = 100,
    phase: Callable[[str], Callable[[float], None] | None] = lambda stage: None,
) -> list[AttackOutcome]:
    """The native attacks of ``attack`` at radius ``eps`` (``AttackPlan.native``), each on the points still unbroken,
    then FMN's ``minnorm`` outcome where the plan measures distances.

    ``phase(stage)`` gives each attack run its ``on_step`` progress callback.
    """
    plan = ATTACK_PLANS[attack]
    label = f"at eps {eps:.4g}"
    outcomes: list[AttackOutcome] = []
    alive = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    for name in plan.native or ():
        if not bool(alive.any()):
            break
        run = NATIVE_RUNS[name]
        outcomes.append(
            attack_unbroken(x0, y, alive, lambda a, b, run=run, name=name: run(
                model, a, b, eps, steps=steps, generator=generator, on_step=phase(f"{name} {label}")
            ))
        )
    if plan.fmn:
        assert minnorm is not None
        outcomes.append(minnorm)
    return outcomes


def run_suite(
    model: nn.Module,
    images: torch.Tensor,
    reference: torch.Tensor,
    eps: Sequence[float],
    attack: str | None = None,
    engine: str = "native",
    batch_size: int = 500,
    seed: int = 0,
    steps: int = 100,
    reference_float32: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
    on_progress: OnProgress | None = None,
    reference_any: torch.Tensor | None = None,
    shards: Shards | None = None,
) -> SuiteResult:
    """Attack every point of ``images`` (floats in [0, 1], on the model's device) at every radius.

    ``attack`` defaults to ``apgd`` natively and to the standard AutoAttack with ``engine="autoattack"``.
    ``reference`` is the class the attacks try to change (cpl-cert passes the exact function's clean
    predictions), ``reference_float32`` cpl-cert's float32 network's and ``reference_any`` the class every float32
    runtime provably computes (``predictions_any``; both default to ``reference``). ``clean`` holds
    the exact clean points in float64 that distances are measured from (default: ``images``).
    ``steps`` is the iteration budget of PGD and APGD (reference: 100); FMN gets twice as many.
    ``engine="autoattack"`` runs the authors' code (optional package ``pyautoattack``) with its standard
    budget; warnings of its own checks land in ``extra["engine_warnings"]``.
    Every example is verified in each sense of ``SENSES`` (``cpl_cert.attacks.check``) before it counts.
    ``on_progress(stage, done, total)`` is called after
    every attack iteration, in points (fractional inside a batch), with the attack and radius as stage.
    ``shards`` (``cpl_cert.shards.join``, under torchrun) attacks batch k on process k mod N (inputs on
    that process's device); every process gets the whole result, equal to a single-process run's.
    """
    attack = attack or default_attack(engine)
    check_attack_options(attack, engine, steps, batch_size)
    model.eval()
    with strict_math():
        checker = make_checker(model)
    # Tensors made under torch.inference_mode (certify's predictions) cannot enter autograd: copy them.
    # A point without a certain class (-1: a tie) has radius 0 and nothing to violate: attack class 0.
    images, reference = images.detach().clone(), reference.detach().clone().clamp_min(0)
    others = [reference if r is None else r.detach().clone().clamp_min(0) for r in (reference_float32, reference_any)]
    clean = (images if clean is None else clean).detach().double()
    n = images.shape[0]
    if shards is not None and shards.enabled:
        shards.agree((n, list(eps), attack, engine, batch_size, seed, steps), "attack options")
        plan = _Plan(checker, images, clean, (reference, *others), list(eps), attack, engine, seed, steps, on_progress or no_progress)
        batches = [slice(begin, min(begin + batch_size, n)) for begin in range(0, n, batch_size)]
        return merge_batches(plan.eps, n, batches, shards.map(batches, plan.attack_batch))
    result = SuiteResult.empty(list(eps), n, images.device)
    rejected = torch.zeros(n, dtype=torch.bool, device=images.device)
    for begin in range(0, n, batch_size):
        part = slice(begin, min(begin + batch_size, n))
        targets = tuple(r[part].to(images.device) for r in (reference, *others))
        tracker = _BatchProgress(on_progress or no_progress, part, n, attack, engine, len(result.eps))
        _attack_batch(checker, images[part].float(), clean[part], targets, result, part, rejected, attack, engine, seed, steps, tracker)
    result.rejected = int(rejected.sum())
    return result.to_cpu()


@dataclass
class _Plan:
    """Everything a batch's attack needs, for a run split over processes (``shards``)."""

    checker: Checker
    images: torch.Tensor
    clean: torch.Tensor
    references: tuple[torch.Tensor, ...]
    eps: list[float]
    attack: str
    engine: str
    seed: int
    steps: int
    on_progress: OnProgress

    def attack_batch(self, part: slice) -> tuple[SuiteResult, torch.Tensor]:
        """The batch ``part``'s own result (its columns only) and rejected mask, on the CPU."""
        size, device = part.stop - part.start, self.images.device
        local, rejected = SuiteResult.empty(self.eps, size, device), torch.zeros(size, dtype=torch.bool, device=device)
        targets = tuple(r[part].to(device) for r in self.references)
        tracker = _BatchProgress(self.on_progress, part, self.images.shape[0], self.attack, self.engine, len(self.eps))
        _attack_batch(
            self.checker, self.images[part].float(), self.clean[part], targets, local, part, rejected, self.attack, self.engine,
            self.seed, self.steps, tracker, at=slice(0, size),
        )
        return local.to_cpu(), rejected.cpu()


def _attack_batch(
    checker: Checker, x0: torch.Tensor, clean: torch.Tensor, targets: tuple[torch.Tensor, ...],
    result: SuiteResult, part: slice, rejected: torch.Tensor, attack: str, engine: str, seed: int, steps: int,
    tracker: _BatchProgress, at: slice | None = None,
) -> None:
    """Run the attacks on one batch at every radius and record the closest verified examples.

    ``part`` is the batch's place in the data set (it seeds the random starts), ``at`` its columns in
    ``result`` and ``rejected`` (default: ``part``)."""
    at = part if at is None else at
    model, y = checker.model, targets[0]
    minnorm = None
    if measures_distance(attack, engine):
        minnorm = fmn_l2(model, x0, y, steps=2 * steps, check_model=checker.model64, on_step=tracker.phase("fmn", 2.0))
    for e, radius in enumerate(result.eps):
        # A fresh seed per (batch, radius): the same points get the same random starts whatever else
        # runs, so the ensemble's APGD part reproduces --attack apgd exactly.
        stream = seed * 1_000_003 + part.start * 101 + e
        if engine == "autoattack":
            from .authors import autoattack_attack

            outcomes, notes = autoattack_attack(model, x0, y, radius, attack, stream, tracker.phase)
            result.note(notes)
        else:
            generator = torch.Generator(device=x0.device).manual_seed(stream)
            outcomes = _native(model, x0, y, radius, attack, generator, minnorm, steps, tracker.phase)
        for outcome in outcomes:
            with strict_math():
                verified = {
                    "exact": verify_exact(checker, clean, outcome, targets[0]),
                    "float32": verify_float32(checker, clean, outcome, targets[1]),
                    "any": verify_any(checker.model, clean, outcome, targets[2]),
                }
            rejected[at] |= outcome.found & torch.stack([torch.isinf(d) for d in verified.values()]).all(dim=0)
            result.record(e, at, outcome, verified)


def merge_batches(eps: list[float], n: int, batches: Sequence[slice], parts: Sequence[tuple[SuiteResult, torch.Tensor]]) -> SuiteResult:
    """One result from each batch's own (``SuiteResult`` of its columns, rejected mask), in batch order:
    what a single run over all batches records (attack names numbered in order of first appearance,
    engine warnings once each in order), so that a run split over processes reports the same."""
    result = SuiteResult.empty(eps, n, torch.device("cpu"))
    rejected = torch.zeros(n, dtype=torch.bool)
    for part, (local, local_rejected) in zip(batches, parts, strict=True):
        for name in local.names:
            if name not in result.names:
                result.names.append(name)
                result.settings[name] = local.settings[name]
        codes = torch.tensor([result.names.index(name) for name in local.names] + [-1], dtype=torch.long)
        for sense in SENSES:
            result.distances[sense][:, part] = local.distances[sense].cpu()
            result.sources[sense][:, part] = codes[local.sources[sense].cpu()]  # -1 (none) picks the last entry: -1
        result.note(local.extra.get("engine_warnings", []))
        rejected[part] = local_rejected.cpu()
    result.rejected = int(rejected.sum())
    return result
