"""The attack names, what each runs with each engine, budgets, and the one check of them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CplCertError


@dataclass(frozen=True)
class AttackPlan:
    """What one ``--attack`` name runs with each engine (``None``: that engine does not run it)."""

    native: tuple[str, ...] | None
    """cpl-cert's fixed-eps attacks at every radius, in order, each on the points the earlier ones left unbroken."""
    fmn: bool
    """Natively, FMN-L2 runs once per batch first: each point's smallest adversarial distance is measured."""
    authors: tuple[str, ...] | None
    """With ``--engine autoattack``: components of Croce & Hein's standard version, in order."""


ATTACK_PLANS = {
    "pgd": AttackPlan(native=("pgd",), fmn=False, authors=None),
    "apgd": AttackPlan(native=("apgd-ce", "apgd-t"), fmn=False, authors=("apgd-ce", "apgd-t")),
    "autoattack": AttackPlan(native=("apgd-ce", "apgd-t", "pgd"), fmn=True, authors=("apgd-ce", "apgd-t", "fab-t", "square")),
    "minnorm": AttackPlan(native=(), fmn=True, authors=None),
    "fab": AttackPlan(native=None, fmn=False, authors=("fab-t",)),
    "square": AttackPlan(native=None, fmn=False, authors=("square",)),
}
"""Every ``--attack`` name and what it runs: the one place an attack name is looked up."""
ATTACKS = tuple(ATTACK_PLANS)
ENGINES = ("native", "autoattack")
DEFAULT_ATTACK = {"native": "apgd", "autoattack": "autoattack"}
"""The attack each engine runs when none is named: APGD natively, the standard AutoAttack with the authors' code."""
NATIVE_ATTACKS = tuple(name for name, plan in ATTACK_PLANS.items() if plan.native is not None)
"""What ``--engine native`` runs: cpl-cert's own attacks."""
ENGINE_ATTACKS = {
    name: plan.authors
    for name, plan in sorted(ATTACK_PLANS.items(), key=lambda item: item[0] != DEFAULT_ATTACK["autoattack"])
    if plan.authors is not None
}
"""What ``--engine autoattack`` runs for each attack it supports (its default first)."""
STANDARD_STEPS = 100
"""The iteration budget of AutoAttack's standard version (the only one ``--engine autoattack`` runs)."""


NATIVE_PASSES = {"pgd": lambda steps: steps + 1, "apgd-ce": lambda steps: steps, "apgd-t": lambda steps: 9 * steps}
"""Forward and backward passes each native fixed-eps attack spends on a point it does not break (APGD-T: 9 targets)."""


def passes_per_point(attack: str, engine: str, steps: int, radii: int) -> float | None:
    """Forward and backward passes a native run spends on a point no attack breaks (FMN: ``2 * steps``, once), an
    upper bound of its cost; ``None`` with ``--engine autoattack``, whose budget is the authors'."""
    plan = ATTACK_PLANS[attack]
    if engine != "native" or plan.native is None:
        return None
    return (2 * steps if plan.fmn else 0) + radii * sum(NATIVE_PASSES[name](steps) for name in plan.native)


def default_attack(engine: str) -> str:
    """The attack ``engine`` runs when none is named (``apgd`` for an unknown engine, which the check refuses)."""
    return DEFAULT_ATTACK.get(engine, "apgd")


def measures_distance(attack: str, engine: str) -> bool:
    """Whether the run finds each point's smallest adversarial distance (the authors' attacks stop at each eps)."""
    plan = ATTACK_PLANS.get(attack)
    return engine == "native" and plan is not None and plan.fmn


def check_attack_options(attack: str, engine: str = "native", steps: int = 100, batch_size: int = 500) -> None:
    """Refuse, with one sentence, an attack run that cannot start (before any work is done).

    The autoattack engine also needs its optional package installed, supports other attacks and
    runs the standard version's fixed budget.
    """
    if attack not in ATTACKS:
        raise CplCertError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if engine not in ENGINES:
        raise CplCertError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if steps < 1:
        raise CplCertError(f"--steps must be a positive number of iterations, got {steps}")
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    plan = ATTACK_PLANS[attack]
    if engine == "native" and plan.native is None:
        raise CplCertError(f"--attack {attack} runs the authors' code only: add --engine autoattack (optional extra autoattack)")
    if engine == "autoattack":
        if plan.authors is None:
            raise CplCertError(f"--engine autoattack runs {', '.join(ENGINE_ATTACKS)}, not {attack}; use --engine native for {attack}")
        if steps != STANDARD_STEPS:
            raise CplCertError(
                f"--engine autoattack runs the standard version's fixed budget of {STANDARD_STEPS} iterations; --steps is for --engine native"
            )
        from .authors import require_autoattack

        require_autoattack()
