"""The attack names, engines and budgets ``run_suite`` accepts, and the one check of them."""

from __future__ import annotations

from ..errors import CplCertError

NATIVE_ATTACKS = ("pgd", "apgd", "autoattack", "minnorm")
"""What ``--engine native`` runs: cpl-cert's own attacks."""
ENGINE_ATTACKS = {
    "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "apgd": ("apgd-ce", "apgd-t"),
    "fab": ("fab-t",),
    "square": ("square",),
}
"""What ``--engine autoattack`` runs for each attack it supports: components of Croce & Hein's standard version, in order."""
ATTACKS = (*NATIVE_ATTACKS, "fab", "square")
ENGINES = ("native", "autoattack")
DEFAULT_ATTACK = {"native": "apgd", "autoattack": "autoattack"}
"""The attack each engine runs when none is named: APGD natively, the standard AutoAttack with the authors' code."""
MEASURES_DISTANCE = ("minnorm", "autoattack")
"""The native attacks that measure each point's smallest adversarial distance (tightness, gap plot)."""
STANDARD_STEPS = 100
"""The iteration budget of AutoAttack's standard version (the only one ``--engine autoattack`` runs)."""


def default_attack(engine: str) -> str:
    """The attack ``engine`` runs when none is named (``apgd`` for an unknown engine, which the check refuses)."""
    return DEFAULT_ATTACK.get(engine, "apgd")


def measures_distance(attack: str, engine: str) -> bool:
    """Whether the run finds each point's smallest adversarial distance (the authors' attacks stop at each eps)."""
    return engine == "native" and attack in MEASURES_DISTANCE


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
    if engine == "native" and attack not in NATIVE_ATTACKS:
        raise CplCertError(f"--attack {attack} runs the authors' code only: add --engine autoattack (optional extra autoattack)")
    if engine == "autoattack":
        if attack not in ENGINE_ATTACKS:
            raise CplCertError(f"--engine autoattack runs {', '.join(ENGINE_ATTACKS)}, not {attack}; use --engine native for {attack}")
        if steps != STANDARD_STEPS:
            raise CplCertError(
                f"--engine autoattack runs the standard version's fixed budget of {STANDARD_STEPS} iterations; --steps is for --engine native"
            )
        from .authors import require_autoattack

        require_autoattack()
