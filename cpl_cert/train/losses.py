"""Training losses for Lipschitz networks: the CPL paper's multi-class hinge and SLL/AOL's offset cross-entropy.

Both push the logit margin up, which is what a certificate ``margin / (sqrt(2) L)`` rewards. Their
``radius-`` variants apply the same loss to the certified radius of every class pair,
``(f_y - f_j) / C[y, j]`` with ``C`` the head's pair Lipschitz constants (differentiable for the LLN
head): with an LLN head a raw logit margin can grow by spreading the head's rows apart without any
gain in radius, which these variants do not reward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CplCertError

LOSSES = ("hinge", "offset-ce", "radius-hinge", "radius-ce")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def hinge_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.7) -> torch.Tensor:
    """``mean_i mean_{j != y_i} max(0, margin - f_y + f_j)`` (PyTorch's ``multi_margin_loss``, p = 1)."""
    return F.multi_margin_loss(logits.float(), labels, margin=margin)


def offset_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, offset: float = 2.1213, temperature: float = 0.25
) -> torch.Tensor:
    """``T * CE((f - offset * onehot(y)) / T, y)``: cross-entropy that keeps pushing until the margin exceeds ``offset``."""
    logits = logits.float()
    shifted = logits - offset * F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(shifted / temperature, labels) * temperature


def pair_constants(head: nn.Module) -> torch.Tensor:
    """``C[i, j]``, the Lipschitz constant of ``f_i - f_j`` in the head's input, differentiable for the LLN head."""
    normalized_weight = getattr(head, "normalized_weight", None)
    if normalized_weight is None:
        return head.pair_lipschitz().float()
    w = normalized_weight().float()
    squared = (w[:, None, :] - w[None, :, :]).pow(2).sum(-1)
    diagonal = torch.eye(w.shape[0], dtype=torch.bool, device=w.device)
    return torch.where(diagonal, 0.0, squared.masked_fill(diagonal, 1.0).sqrt())  # no sqrt(0): its gradient is inf


def radius_logits(logits: torch.Tensor, labels: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``r[i, j] = -(f_y - f_j) / C[y, j]`` (minus the certified radius against class ``j``), ``r[i, y] = 0``."""
    logits = logits.float()
    own = F.one_hot(labels, logits.shape[1]).bool()
    rows = pair.to(logits.device)[labels].masked_fill(own, 1.0)
    return (logits - logits.gather(1, labels[:, None])) / rows


def check_loss(name: str, margin: float = 0.7, offset: float = 2.1213, temperature: float = 0.25) -> None:
    """One clear sentence for a loss name or parameter that cannot train."""
    if name not in LOSSES:
        raise CplCertError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    base = name.removeprefix("radius-")
    if base == "hinge" and margin <= 0:
        raise CplCertError(f"--margin must be positive, got {margin}")
    if base != "hinge" and (temperature <= 0 or offset < 0):
        raise CplCertError("--temperature must be positive and --offset non-negative")


def make_loss(
    name: str, margin: float = 0.7, offset: float = 2.1213, temperature: float = 0.25, head: nn.Module | None = None
) -> LossFn:
    """The loss function ``(logits, labels) -> scalar`` called ``name`` (one of ``LOSSES``).

    The ``radius-`` losses need the model's ``head``; their margin or offset is a radius in input space.
    """
    check_loss(name, margin, offset, temperature)
    base = name.removeprefix("radius-")
    loss: LossFn
    if base == "hinge":
        loss = lambda logits, labels: hinge_loss(logits, labels, margin)  # noqa: E731
    else:
        loss = lambda logits, labels: offset_cross_entropy(logits, labels, offset, temperature)  # noqa: E731
    if name == base:
        return loss
    if head is None:
        raise CplCertError(f"the {name} loss needs the model's head")
    return lambda logits, labels: loss(radius_logits(logits, labels, pair_constants(head)), labels)
