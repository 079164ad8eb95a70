"""The attack names, engines and budgets ``run_suite`` accepts, and the one check of them."""

from __future__ import annotations

from ..errors import CplCertError

ATTACKS = ("pgd", "apgd", "autoattack", "minnorm")
ENGINES = ("native", "torchattacks")
ENGINE_ATTACKS = {"pgd": ("PGDL2",), "apgd": ("APGD", "APGDT"), "autoattack": ("APGD", "APGDT", "FAB", "Square")}
"""What ``--engine torchattacks`` runs for each attack it supports."""


def check_attack_options(attack: str, engine: str = "native", steps: int = 100, batch_size: int = 500) -> None:
    """Refuse, with one sentence, an attack run that cannot start (before any work is done).

    The torchattacks engine also needs its optional package installed and supports fewer attacks.
    """
    if attack not in ATTACKS:
        raise CplCertError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if engine not in ENGINES:
        raise CplCertError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if steps < 1:
        raise CplCertError(f"--steps must be a positive number of iterations, got {steps}")
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    if engine == "torchattacks":
        from .external import require_torchattacks

        require_torchattacks()
        if attack not in ENGINE_ATTACKS:
            raise CplCertError(f"--engine torchattacks runs {', '.join(ENGINE_ATTACKS)}, not {attack}; use --engine native for {attack}")
