"""Shared pieces of the l2 attacks: norms, the projection onto ball and pixel box, losses, results.

Every attack works on raw pixels in [0, 1] (the models normalise inside), attacks a point with respect
to a reference class (cpl-cert uses the clean *prediction*, so a success is exactly "the prediction
changed", the event a certificate rules out) and returns an ``AttackOutcome``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttackOutcome:
    """Per-point result of one attack on one batch.

    ``found[i]``: an input changing the prediction was found; ``adversarial[i]`` is it (the clean point
    otherwise); ``distance[i]`` its l2 distance to the clean point (``inf`` when nothing was found).
    """

    found: torch.Tensor
    adversarial: torch.Tensor
    distance: torch.Tensor
    name: str
    settings: dict[str, Any] = field(default_factory=dict)


def batch_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def l2_norm(values: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norm of ``(B, ...)``, scaled by the largest entry so that squares neither underflow
    (entries below about 1e-19 in float32) nor overflow: attacks work at any input scale."""
    flat = values.flatten(1)
    scale = flat.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (flat / safe).norm(dim=1) * scale.squeeze(1)


def normalize(values: torch.Tensor) -> torch.Tensor:
    """Per-sample unit-l2 direction (zero stays zero), at any scale."""
    norm = l2_norm(values)
    return values / batch_view(torch.where(norm > 0, norm, torch.ones_like(norm)), values)


def project(x0: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float) -> torch.Tensor:
    """Project ``x`` onto the l2 ball of radius ``eps`` around ``x0``, then onto the pixel box [0, 1].

    Clipping to the box is the projection onto a convex set containing ``x0``, hence non-expansive:
    the result stays inside the ball, so it satisfies both constraints.
    """
    delta = x - x0
    radius = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    factor = (radius / l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x0 + delta * batch_view(factor, delta)).clamp_(0.0, 1.0)


def per_point(eps: float | torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``eps`` as a per-point vector ``(B,)`` in the dtype of ``x0`` (a number, or already one per point)."""
    return torch.as_tensor(eps, dtype=x0.dtype, device=x0.device).expand(x0.shape[0]).clone()


def random_in_ball(x0: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None, on_sphere: bool) -> torch.Tensor:
    """A random start in (or on the sphere of) the eps-balls (``eps`` per point), clipped to the box."""
    direction = normalize(torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
    if on_sphere:
        radius = eps
    else:
        radius = eps * torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    return (x0 + direction * batch_view(radius, x0)).clamp_(0.0, 1.0)


def other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j`` per sample."""
    return logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y``: positive exactly when the prediction is not ``y`` (to maximise)."""
    return other_max(logits, y) - logits.gather(1, y[:, None]).squeeze(1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (to maximise)."""
    return F.cross_entropy(logits, y, reduction="none")


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` (to maximise).

    Scale invariant, which matters for Lipschitz networks whose logits are small. With fewer than four
    classes the denominator does not exist and the plain targeted margin ``z_t - z_y`` is used.
    """
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    if logits.shape[1] < 4:
        return z_t - z_y
    ordered = logits.sort(dim=1, descending=True).values
    scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12
    return -(z_y - z_t) / scale


def is_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True where the model's prediction at ``x`` is not ``y``."""
    with torch.no_grad():
        return model(x).argmax(dim=1) != y


def loss_and_grad(
    model: nn.Module, x: torch.Tensor, loss_fn: Any, *args: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per-sample loss, its gradient w.r.t. x, logits)``: one forward and one backward pass."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = loss_fn(logits, *args)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad.detach(), logits.detach()


def distances(x0: torch.Tensor, x: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """float64 l2 distances where ``found``, ``inf`` elsewhere."""
    d = l2_norm(x.double() - x0.double())
    return torch.where(found, d, torch.full_like(d, float("inf")))


def unbroken(found: torch.Tensor) -> torch.Tensor:
    """Indices of the points no attack has broken yet (``found`` false): the ones the next attack or restart runs on."""
    return (~found).nonzero().flatten()


def attack_unbroken(
    x0: torch.Tensor, y: torch.Tensor, alive: torch.Tensor, run: Callable[[torch.Tensor, torch.Tensor], AttackOutcome]
) -> AttackOutcome:
    """``run`` on the points of ``x0`` still ``alive`` (their classes ``y``), as an outcome over all of ``x0``;
    the points it breaks leave ``alive`` (in place), so that a chain of attacks tries each point until one breaks it."""
    idx = alive.nonzero().flatten()
    part = run(x0[idx], y[idx])
    out = empty_outcome(x0, part.name, part.settings)
    out.found[idx], out.adversarial[idx], out.distance[idx] = part.found, part.adversarial, part.distance
    alive &= ~out.found
    return out


def empty_outcome(x0: torch.Tensor, name: str, settings: dict[str, Any]) -> AttackOutcome:
    """Nothing found yet: adversarial = clean point, distance = inf."""
    found = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    return AttackOutcome(found, x0.clone(), distances(x0, x0, found), name, settings)
