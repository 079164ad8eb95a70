"""PGD in the l2 norm (Madry et al. 2018) with random starts and restarts.

Reference settings: ``steps=100``, ``restarts=1``, step ``2.5 * eps / steps`` along the normalised
gradient of the cross-entropy, a uniform random start in the eps-ball, and after every step the
projection onto the eps-ball and the pixel box [0, 1]. A point leaves the batch as soon as its
prediction changes; only the points not yet broken keep iterating.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .common import (
    AttackOutcome,
    batch_view,
    ce_loss,
    distances,
    empty_outcome,
    loss_and_grad,
    margin_loss,
    normalize,
    per_point,
    project,
    random_in_ball,
    unbroken,
)

LOSSES = {"ce": ce_loss, "margin": margin_loss}


def pgd_l2(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 100,
    restarts: int = 1,
    step_size: float | None = None,
    loss: str = "ce",
    generator: torch.Generator | None = None,
    on_step: Callable[[float], None] | None = None,
) -> AttackOutcome:
    """Search the l2 ball of radius ``eps`` (a number or one per point) around each ``x0[i]`` for an input not predicted ``y[i]``.

    ``on_step(fraction)`` is told after every iteration which fraction of the budget is done.
    """
    radii = per_point(eps, x0)
    steps_all = per_point(step_size, x0) if step_size is not None else 2.5 * radii / steps
    settings = {"steps": steps, "restarts": restarts, "step_size": "2.5 * eps / steps" if step_size is None else step_size,
                "loss": loss, "random_start": "uniform in ball"}
    out = empty_outcome(x0, "pgd", settings)
    loss_fn = LOSSES[loss]
    for restart in range(restarts):
        idx = unbroken(out.found)
        if idx.numel() == 0:
            break
        start, labels, r, step = x0[idx], y[idx], radii[idx], steps_all[idx]
        x = random_in_ball(start, r, generator, on_sphere=False)
        for k in range(steps + 1):
            values, grad, logits = loss_and_grad(model, x, loss_fn, labels)
            hit = logits.argmax(dim=1) != labels
            if bool(hit.any()):
                out.found[idx[hit]] = True
                out.adversarial[idx[hit]] = x[hit]
                keep = ~hit
                idx, start, labels, x, grad = idx[keep], start[keep], labels[keep], x[keep], grad[keep]
                r, step = r[keep], step[keep]
                if idx.numel() == 0:
                    break
            if on_step is not None:
                on_step((restart + (k + 1) / (steps + 1)) / restarts)
            if k == steps:
                break
            x = project(start, x + batch_view(step, x) * normalize(grad), r)
    if on_step is not None:
        on_step(1.0)
    out.distance = distances(x0, out.adversarial, out.found)
    return out
