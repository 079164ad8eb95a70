"""Optional engine: the same budget run through the ``torchattacks`` package (an optional extra).

``torchattacks`` pins an old ``requests``, so cpl-cert never depends on it; ``--engine torchattacks``
uses it when it is importable. Reference budget (not its AutoAttack wrapper's 10-step defaults):
APGD (CE) and APGD-T with 100 steps and 9 target classes, FAB (multi-targeted) with 100 steps,
Square with 5000 queries, PGD-L2 with 100 steps of ``2.5 * eps / 100``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CplCertError
from .common import AttackOutcome, distances, empty_outcome, is_adversarial
from .options import ENGINE_ATTACKS

INSTALL_HINT = (
    "the torchattacks engine needs the optional package torchattacks, which is not installed; install it with "
    "pip install torchattacks (or pip install '.[torchattacks]' in the cpl-cert folder), or use --engine native"
)


def require_torchattacks() -> Any:
    """Import ``torchattacks`` or fail with one sentence naming what is really missing and how to install it."""
    try:
        import torchattacks  # type: ignore[import-not-found]
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing.split(".")[0] != "torchattacks":
            raise CplCertError(
                f"torchattacks is installed but cannot be imported: it needs the module {missing!r}, which is missing "
                f"(pip install {missing.split('.')[0]}), or use --engine native"
            ) from None
        raise CplCertError(INSTALL_HINT) from None
    return torchattacks


def _builders(ta: Any, eps: float, num_classes: int, seed: int) -> dict[str, Callable[[nn.Module], Any]]:
    return {
        "PGDL2": lambda m: ta.PGDL2(m, eps=eps, alpha=2.5 * eps / 100, steps=100, random_start=True),
        "APGD": lambda m: ta.APGD(m, norm="L2", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
        "APGDT": lambda m: ta.APGDT(m, norm="L2", eps=eps, steps=100, n_restarts=1, n_classes=num_classes, seed=seed),
        "FAB": lambda m: ta.FAB(m, norm="L2", eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=num_classes, seed=seed),
        "Square": lambda m: ta.Square(m, norm="L2", eps=eps, n_queries=5000, n_restarts=1, seed=seed),
    }


def engine_settings(attack: str) -> dict[str, Any]:
    """The budget each torchattacks attack is run with (for the JSON report)."""
    table = {
        "PGDL2": {"steps": 100, "step_size": "2.5 * eps / steps", "random_start": True},
        "APGD": {"steps": 100, "restarts": 1, "loss": "ce"},
        "APGDT": {"steps": 100, "restarts": 1, "targets": 9},
        "FAB": {"steps": 100, "restarts": 1, "multi_targeted": True},
        "Square": {"queries": 5000, "restarts": 1},
    }
    return {f"torchattacks.{name}": table[name] for name in ENGINE_ATTACKS[attack]}


def torchattacks_attack(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, attack: str, seed: int) -> list[AttackOutcome]:
    """Run the torchattacks attacks of ``attack`` in turn, each on the points still unbroken.

    ``attack`` is one of ``ENGINE_ATTACKS`` (``options.check_attack_options`` has checked it).
    """
    ta = require_torchattacks()
    with torch.no_grad():
        num_classes = int(model(x0[:1]).shape[1])
    builders = _builders(ta, eps, num_classes, seed)
    outcomes: list[AttackOutcome] = []
    alive = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    for name in ENGINE_ATTACKS[attack]:
        out = empty_outcome(x0, f"torchattacks.{name}", engine_settings(attack)[f"torchattacks.{name}"])
        idx = alive.nonzero().flatten()
        if idx.numel():
            adv = builders[name](model)(x0[idx], y[idx]).detach().to(x0.dtype).clamp(0.0, 1.0)
            hit = is_adversarial(model, adv, y[idx])
            out.found[idx[hit]] = True
            out.adversarial[idx[hit]] = adv[hit]
            alive[idx[hit]] = False
        out.distance = distances(x0, out.adversarial, out.found)
        outcomes.append(out)
    return outcomes
