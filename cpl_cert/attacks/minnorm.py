"""Minimum-norm attack: FMN-L2 (Pintor et al., NeurIPS 2021) followed by a bisection along the best direction.

For each point it returns the smallest l2 perturbation found that changes the prediction.
Reference settings: ``steps=200``; step ``alpha`` cosine-annealed from 1.0 to 0.01 (in pixel l2 units);
ball-radius factor ``gamma`` annealed from 0.05 to 0.001; the radius grows by the linearised distance
to the boundary (times ``1 + gamma``) until a first adversarial example is found, then shrinks by ``(1 - gamma)`` while
adversarial and grows by ``(1 + gamma)`` while not; finally ``refine=20`` bisection steps on the
segment from the clean point to the best adversarial one tighten the distance (the result stays
adversarial). Unlike the fixed-eps attacks every point iterates for the whole budget, since the
goal is to shrink the distance after the first success.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .common import AttackOutcome, batch_view, distances, l2_norm, loss_and_grad, normalize, project

CLEAR_MARGIN = 1e-5
"""A candidate only becomes the best one when its margin is below ``-CLEAR_MARGIN`` (logit units), so float
rounding cannot make it non-adversarial on re-verification; it costs about ``1e-5 / ||grad||`` in distance."""


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j``: negative exactly when the prediction is not ``y`` (to minimise)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return z_y - logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values


def _cosine(k: int, steps: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * k / steps))


BISECTION_COST = 2.5
"""A bisection step (float32 and float64 forward passes) costs about this many FMN iterations (progress only)."""


@torch.no_grad()
def bisect_to_boundary(
    model: nn.Module, x0: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, found: torch.Tensor, steps: int = 20,
    check_model: nn.Module | None = None,
    on_step: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """Shrink ``x0 + t (x_adv - x0)`` towards ``x0`` while it stays adversarial (bisection on ``t``).

    With ``check_model`` (a float64 copy) a candidate must be adversarial for both models, so the
    bisection never steps onto the float32 side of a boundary that float64 re-verification rejects.
    ``on_step(fraction)`` is told after every step which fraction of the bisection is done.
    """
    if steps <= 0 or not bool(found.any()):
        return x_adv
    delta = x_adv - x0
    low = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    high = torch.ones_like(low)
    for k in range(steps):
        mid = 0.5 * (low + high)
        candidate = x0 + batch_view(mid, delta) * delta
        adv = model(candidate).argmax(dim=1) != y
        if check_model is not None:
            adv &= check_model(candidate.double()).argmax(dim=1) != y
        high = torch.where(adv, mid, high)
        low = torch.where(adv, low, mid)
        if on_step is not None:
            on_step((k + 1) / steps)
    shrunk = x0 + batch_view(high, delta) * delta
    return torch.where(batch_view(found, x0), shrunk, x_adv)


def fmn_l2(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    steps: int = 200,
    alpha_init: float = 1.0,
    alpha_final: float = 0.01,
    gamma_init: float = 0.05,
    gamma_final: float = 0.001,
    refine: int = 20,
    check_model: nn.Module | None = None,
    on_step: Callable[[float], None] | None = None,
) -> AttackOutcome:
    """Smallest l2 perturbation found (per point) that makes the prediction differ from ``y``.

    ``on_step(fraction)`` is told after every iteration which fraction of the budget is done.
    """
    settings = {
        "steps": steps, "alpha": [alpha_init, alpha_final], "gamma": [gamma_init, gamma_final], "refine": refine,
    }
    n = x0.shape[0]
    delta = torch.zeros_like(x0)
    radius = torch.zeros(n, dtype=x0.dtype, device=x0.device)
    best_norm = torch.full((n,), math.inf, dtype=x0.dtype, device=x0.device)
    best = x0.clone()
    share = (steps + 1) / (steps + 1 + BISECTION_COST * refine)  # of the budget spent before the bisection
    for k in range(steps + 1):
        x = (x0 + delta).clamp(0.0, 1.0)
        margin, grad, logits = loss_and_grad(model, x, _margin, y)
        adversarial = logits.argmax(dim=1) != y
        norm = l2_norm(x - x0)
        improved = adversarial & (margin < -CLEAR_MARGIN) & (norm < best_norm)
        best_norm = torch.where(improved, norm, best_norm)
        best = torch.where(batch_view(improved, x0), x, best)
        if on_step is not None:
            on_step(share * (k + 1) / (steps + 1))
        if k == steps:
            break
        gamma = _cosine(k, steps, gamma_init, gamma_final)
        alpha = _cosine(k, steps, alpha_init, alpha_final)
        grad_norm = l2_norm(grad).clamp_min(1e-12)
        none_yet = torch.isinf(best_norm)
        # Before the first success: the linearised distance to a margin of -2 CLEAR_MARGIN, overshot by gamma
        # so that a point landing exactly on the boundary (a tie) still crosses it. The radius shrinks only
        # from clearly adversarial iterates (those that can become the best): a point whose clean margin is
        # below the clearance would otherwise hover on the boundary and never be found.
        grow = torch.where(none_yet, radius + (margin + 2 * CLEAR_MARGIN).clamp_min(0) / grad_norm, radius) * (1 + gamma)
        clear = adversarial & (margin < -CLEAR_MARGIN)
        radius = torch.where(clear, torch.minimum(radius * (1 - gamma), best_norm), grow)
        delta = project(x0, x0 + delta - alpha * normalize(grad), radius) - x0
    found = torch.isfinite(best_norm)
    bisect_step = None if on_step is None else (lambda fraction: on_step(share + (1 - share) * fraction))
    best = bisect_to_boundary(model, x0, best, y, found, refine, check_model, bisect_step)
    if on_step is not None:
        on_step(1.0)
    return AttackOutcome(found, best, distances(x0, best, found), "fmn", settings)
