"""Training losses for Lipschitz networks: the CPL paper's multi-class hinge and SLL/AOL's offset cross-entropy.

Both push the logit margin up, which is what a certificate ``margin / (sqrt(2) L)`` rewards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import CplCertError

LOSSES = ("hinge", "offset-ce")
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


def make_loss(name: str, margin: float = 0.7, offset: float = 2.1213, temperature: float = 0.25) -> LossFn:
    """The loss function ``(logits, labels) -> scalar`` called ``name`` (one of ``LOSSES``)."""
    if name == "hinge":
        if margin <= 0:
            raise CplCertError(f"--margin must be positive, got {margin}")
        return lambda logits, labels: hinge_loss(logits, labels, margin)
    if name == "offset-ce":
        if temperature <= 0 or offset < 0:
            raise CplCertError("--temperature must be positive and --offset non-negative")
        return lambda logits, labels: offset_cross_entropy(logits, labels, offset, temperature)
    raise CplCertError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
