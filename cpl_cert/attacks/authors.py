"""Optional engine: Croce & Hein's own AutoAttack code, from the registry package ``pyautoattack``.

``pyautoattack`` (extra ``autoattack``) packages fra31/auto-attack: its ``autopgd_base.py``,
``fab_base.py``, ``fab_pt.py`` and ``square.py`` are the repository's files with relative imports;
only the ``AutoAttack`` wrapper was rewritten with keyword arguments. cpl-cert builds that wrapper
with norm ``L2``, the radius and version ``standard`` (APGD-CE with 1 restart, APGD-T and FAB-T with
9 target classes, 100 iterations each, Square with 5,000 queries) and lets it run one component at a
time on the points still unbroken, in the standard order, exactly as its standard evaluation does
(the same object, the same seed), so that every adversarial example is attributed to the component
that found it. Nothing the authors' code returns counts before cpl-cert re-verifies it
(``cpl_cert.attacks.check``). Warnings of the authors' own checks (e.g. "Square Attack has decreased
the robust accuracy") are returned as notes, never printed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import CplCertError
from .common import AttackOutcome, attack_unbroken, distances, empty_outcome, is_adversarial
from .options import ATTACK_PLANS

INSTALL_HINT = (
    "the autoattack engine needs the optional package pyautoattack (Croce & Hein's AutoAttack code), which is not installed; "
    "install it with pip install pyautoattack (or pip install '.[autoattack]' in the cpl-cert folder), or use --engine native"
)
LOGGER = "auto-attack"
"""The logger the authors' wrapper writes to (its checks warn there)."""
COST = {"apgd-ce": 1.0, "apgd-t": 8.0, "fab-t": 12.0, "square": 22.0}
"""Relative time of each component on a point it does not break (measured on fmnist-cpl-xs, CPU): progress shares."""
Phase = Callable[[str, float], Callable[[float], None]]


def require_autoattack() -> Any:
    """Import ``pyautoattack`` or fail with one sentence naming what is really missing and how to install it."""
    try:
        import pyautoattack  # type: ignore[import-not-found]
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing and missing.split(".")[0] != "pyautoattack":
            raise CplCertError(
                f"pyautoattack is installed but cannot be imported: it needs the module {missing!r}, which is missing "
                f"(pip install {missing.split('.')[0]}), or use --engine native"
            ) from None
        raise CplCertError(INSTALL_HINT) from None
    return pyautoattack


class _Counted(nn.Module):
    """The model, counting forward passes to report progress (``on_step(fraction)``) from inside the authors' loops."""

    def __init__(self, model: nn.Module, expected: float, on_step: Callable[[float], None] | None) -> None:
        super().__init__()
        self.model, self.expected, self.on_step, self.calls = model, max(expected, 1.0), on_step, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.on_step is not None:
            self.on_step(min(self.calls / self.expected, 1.0))
        return self.model(x)


def standard_autoattack(model: nn.Module, eps: float, seed: int, device: torch.device) -> Any:
    """The authors' ``AutoAttack`` wrapper for l2 radius ``eps``, version ``standard``."""
    aa = require_autoattack()
    return aa.AutoAttack(model, norm="L2", eps=float(eps), seed=seed, device=device, version="standard")


def component_settings(runner: Any, name: str) -> dict[str, Any]:
    """The budget component ``name`` runs with, read from the authors' configured objects (for the JSON report)."""
    common = {"code": f"pyautoattack {require_autoattack().__version__} (Croce & Hein)", "version": runner.version, "norm": runner.norm}
    if name == "apgd-ce":
        apgd = runner.apgd
        return {**common, "iterations": apgd.n_iter, "restarts": apgd.n_restarts, "loss": "ce", "rho": apgd.thr_decr}
    if name == "apgd-t":
        apgd = runner.apgd_targeted
        targets = apgd.n_target_classes
        return {**common, "iterations": apgd.n_iter, "restarts": apgd.n_restarts, "targets": targets, "loss": "dlr-targeted", "rho": apgd.thr_decr}
    if name == "fab-t":
        return {**common, "iterations": runner.fab.n_iter, "restarts": 1, "targets": runner.fab.n_target_classes}
    square = runner.square
    return {**common, "queries": square.n_queries, "restarts": square.n_restarts, "p_init": square.p_init}


def _expected_calls(runner: Any, name: str) -> float:
    """Forward passes of component ``name`` on points it does not break (its progress denominator)."""
    if name == "apgd-ce":
        return runner.apgd.n_iter * runner.apgd.n_restarts
    if name == "apgd-t":
        return runner.apgd_targeted.n_iter * runner.apgd_targeted.n_target_classes * runner.apgd_targeted.n_restarts
    if name == "fab-t":
        return 2 * runner.fab.n_iter * runner.fab.n_target_classes
    return runner.square.n_queries


class _Notes(logging.Handler):
    """Collects the warnings of the authors' checks (each once) instead of letting logging print them."""

    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.notes:
            self.notes.append(message)


@contextmanager
def _isolated(model: nn.Module, device: torch.device, notes: list[str]) -> Iterator[None]:
    """Run the authors' code without side effects: parameters keep no gradients (FAB calls ``backward``),
    the caller's random state is restored (the attacks reseed torch's global generator) and the
    wrapper's warnings become ``notes``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handler, logger = _Notes(notes), logging.getLogger(LOGGER)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    logger.addHandler(handler)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        logger.removeHandler(handler)
        for p, flag in flags:
            p.requires_grad_(flag)


def run_component(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, name: str, seed: int = 0,
    on_step: Callable[[float], None] | None = None, notes: list[str] | None = None,
) -> AttackOutcome:
    """One component of the standard AutoAttack (``apgd-ce``, ``apgd-t``, ``fab-t`` or ``square``) on every point
    of ``x0`` (floats in [0, 1]) against class ``y``, through the authors' wrapper. ``found`` marks the points
    whose float32 prediction the returned example changes (cpl-cert still verifies them)."""
    notes = [] if notes is None else notes
    with _isolated(model, x0.device, notes):
        counted = _Counted(model, 0.0, on_step)
        runner = standard_autoattack(counted, eps, seed, x0.device)
        counted.expected = float(_expected_calls(runner, name))
        out = empty_outcome(x0, f"autoattack.{name}", component_settings(runner, name))
        if x0.shape[0]:
            runner.attacks_to_run = [name]
            adv, _ = runner.run_standard_evaluation(x0, y, batch_size=x0.shape[0])
            adv = adv.detach().to(x0.dtype)
            out.found = is_adversarial(model, adv, y)
            out.adversarial = torch.where(out.found.view(-1, *[1] * (x0.dim() - 1)), adv, x0)
            out.distance = distances(x0, out.adversarial, out.found)
    if on_step is not None:
        on_step(1.0)
    return out


def autoattack_attack(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, eps: float, attack: str, seed: int = 0, phase: Phase | None = None,
) -> tuple[list[AttackOutcome], list[str]]:
    """The components of ``attack`` (``AttackPlan.authors``) in turn, each on the points the earlier ones left unbroken.

    ``phase(stage, weight)`` gives each component its progress callback. Returns one outcome per
    component (over the whole batch) and the warnings of the authors' checks.
    """
    outcomes: list[AttackOutcome] = []
    notes: list[str] = []
    alive = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    for name in ATTACK_PLANS[attack].authors or ():
        on_step = phase(f"{name} at eps {eps:.4g}", COST[name]) if phase is not None else None
        outcomes.append(attack_unbroken(x0, y, alive, lambda a, b, name=name, on_step=on_step: run_component(
            model, a, b, eps, name, seed, on_step, notes
        )))
    return outcomes, notes
