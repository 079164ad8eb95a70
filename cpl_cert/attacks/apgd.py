"""APGD in the l2 norm (Croce & Hein, ICML 2020): untargeted with cross-entropy, targeted with DLR.

Reference settings (AutoAttack's "standard" l2 version): ``steps=100``; initial step ``2 * eps``;
momentum ``alpha = 0.75``; checkpoints at ``w_j = ceil(p_j * steps)`` with ``p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``; at a checkpoint the step of a point is halved and
it restarts from its best point when fewer than ``rho = 0.75`` of the steps since the last checkpoint
raised its loss, or when its step was not halved at the last checkpoint and its best loss has not
improved since. APGD-CE: 1 restart from a random point on the eps-sphere. APGD-T: 9 target classes
(the 9 highest-scoring other classes at the clean point), 1 restart each, targeted DLR loss.
Points leave the batch as soon as their prediction changes.
"""

from __future__ import annotations

import math
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
    normalize,
    per_point,
    project,
    random_in_ball,
    targeted_dlr_loss,
    unbroken,
)

RHO = 0.75
MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """Croce & Hein's checkpoint iterations ``w_j`` (without 0) for a budget of ``steps``."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = sorted({math.ceil(round(v * steps, 9)) for v in p if v <= 1.0} - {0})
    return [w for w in points if w <= steps]


State = dict[str, torch.Tensor]
Evaluate = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _evaluator(model: nn.Module) -> Evaluate:
    """``(x, labels, target) -> (loss, grad, logits)``: cross-entropy, or targeted DLR when a target is given."""

    def evaluate(x: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if target is None:
            return loss_and_grad(model, x, ce_loss, labels)
        return loss_and_grad(model, x, targeted_dlr_loss, labels, target)

    return evaluate


def _initial_state(start: torch.Tensor, labels: torch.Tensor, radii: torch.Tensor, target: torch.Tensor | None,
                   x: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> State:
    """Per point: the iterate and the previous one, the best point so far, the step and the checkpoint counters."""
    n = start.shape[0]
    state = {
        "start": start, "labels": labels, "eps": radii, "x": x, "x_prev": x.clone(), "grad": grad, "loss": loss,
        "x_best": x.clone(), "grad_best": grad.clone(), "loss_best": loss.clone(),
        "step": 2.0 * radii,
        "increases": torch.zeros(n, dtype=torch.long, device=x.device),
        "best_at_check": loss.clone(),
        "reduced": torch.zeros(n, dtype=torch.bool, device=x.device),
    }
    if target is not None:
        state["target"] = target
    return state


def _drop_hits(state: State, logits: torch.Tensor, out: AttackOutcome, idx: torch.Tensor) -> torch.Tensor:
    """Record the points whose prediction changed in ``out`` and remove them from ``state``; returns the rest of ``idx``."""
    hit = logits.argmax(dim=1) != state["labels"]
    if not bool(hit.any()):
        return idx
    out.found[idx[hit]] = True
    out.adversarial[idx[hit]] = state["x"][hit]
    keep = ~hit
    for key in state:
        state[key] = state[key][keep]
    return idx[keep]


def _momentum_step(state: State, k: int, evaluate: Evaluate) -> torch.Tensor:
    """One APGD iteration (projected gradient step, then momentum from iteration 1 on); returns the logits."""
    s = state
    x, step = s["x"], batch_view(s["step"], s["x"])
    z = project(s["start"], x + step * normalize(s["grad"]), s["eps"])
    if k > 0:
        z = project(s["start"], x + MOMENTUM * (z - x) + (1.0 - MOMENTUM) * (x - s["x_prev"]), s["eps"])
    s["x_prev"], s["x"] = x, z
    loss, grad, logits = evaluate(z, s["labels"], s.get("target"))
    s["increases"] += (loss > s["loss"]).long()
    s["loss"], s["grad"] = loss, grad
    better = loss > s["loss_best"]
    s["loss_best"] = torch.where(better, loss, s["loss_best"])
    s["x_best"] = torch.where(batch_view(better, z), z, s["x_best"])
    s["grad_best"] = torch.where(batch_view(better, z), grad, s["grad_best"])
    return logits


def _at_checkpoint(state: State, height: int) -> None:
    """Halve the step and restart from the best point where progress stalled over the last ``height`` iterations."""
    s = state
    reduce = (s["increases"].double() < RHO * height) | (~s["reduced"] & (s["best_at_check"] >= s["loss_best"]))
    s["reduced"], s["best_at_check"] = reduce, s["loss_best"].clone()
    s["increases"].zero_()
    s["step"] = torch.where(reduce, s["step"] / 2, s["step"])
    r = batch_view(reduce, s["x"])
    s["x"] = torch.where(r, s["x_best"], s["x"])
    s["x_prev"] = torch.where(r, s["x_best"], s["x_prev"])
    s["grad"] = torch.where(r, s["grad_best"], s["grad"])


def _apgd_run(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int,
    target: torch.Tensor | None,
    out: AttackOutcome,
    idx: torch.Tensor,
    generator: torch.Generator | None,
    random_start: bool,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """One APGD run on the points ``idx`` of the batch; records successes in ``out`` in place.

    ``on_step(fraction)`` is told after every iteration which fraction of the run is done.
    """
    start, labels, radii = x0[idx], y[idx], per_point(eps, x0)[idx]
    tgt = target[idx] if target is not None else None
    evaluate = _evaluator(model)
    x = random_in_ball(start, radii, generator, on_sphere=True) if random_start else start.clone()
    loss, grad, logits = evaluate(x, labels, tgt)
    state = _initial_state(start, labels, radii, tgt, x, loss, grad)
    idx = _drop_hits(state, logits, out, idx)
    marks, last_mark = checkpoints(steps), 0
    for k in range(steps):
        if idx.numel() == 0:
            return
        idx = _drop_hits(state, _momentum_step(state, k, evaluate), out, idx)
        if on_step is not None:
            on_step((k + 1) / steps)
        if k + 1 in marks and idx.numel():
            _at_checkpoint(state, k + 1 - last_mark)
            last_mark = k + 1


def _part(on_step: Callable[[float], None] | None, index: int, count: int) -> Callable[[float], None] | None:
    """``on_step`` for run ``index`` of ``count`` equal runs: its fraction mapped into the whole budget's."""
    if on_step is None:
        return None
    return lambda fraction: on_step((index + fraction) / count)


def _done(on_step: Callable[[float], None] | None) -> None:
    if on_step is not None:
        on_step(1.0)


def apgd_l2(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 100,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    on_step: Callable[[float], None] | None = None,
) -> AttackOutcome:
    """APGD-CE: untargeted APGD on the cross-entropy of class ``y``; ``on_step(fraction of the budget done)``."""
    out = empty_outcome(x0, "apgd-ce", {"steps": steps, "restarts": restarts, "loss": "ce", "rho": RHO, "momentum": MOMENTUM})
    for restart in range(restarts):
        idx = unbroken(out.found)
        if idx.numel() == 0:
            break
        _apgd_run(model, x0, y, eps, steps, None, out, idx, generator, random_start=True, on_step=_part(on_step, restart, restarts))
    _done(on_step)
    out.distance = distances(x0, out.adversarial, out.found)
    return out


def apgd_targeted_l2(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    steps: int = 100,
    targets: int = 9,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    on_step: Callable[[float], None] | None = None,
) -> AttackOutcome:
    """APGD-T: targeted DLR APGD against each of the ``targets`` highest-scoring other classes in turn.

    ``on_step(fraction)`` is told after every iteration which fraction of the budget is done.
    """
    with torch.no_grad():
        logits = model(x0)
    num_targets = min(targets, logits.shape[1] - 1)
    settings = {"steps": steps, "targets": num_targets, "restarts": restarts, "loss": "targeted-dlr", "rho": RHO, "momentum": MOMENTUM}
    out = empty_outcome(x0, "apgd-t", settings)
    ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
    for rank in range(num_targets):
        for restart in range(restarts):
            idx = unbroken(out.found)
            if idx.numel() == 0:
                break
            report = _part(on_step, rank * restarts + restart, num_targets * restarts)
            _apgd_run(model, x0, y, eps, steps, ranked[:, rank], out, idx, generator, random_start=True, on_step=report)
    _done(on_step)
    out.distance = distances(x0, out.adversarial, out.found)
    return out
