"""Certified predictions for new inputs: the predicted class and the radius within which it cannot change.

A thin layer over ``cpl_cert.certify``: the inputs get placeholder labels and only the predictions
and certified radii are kept, so they are exactly the numbers ``certify`` gives for the same images
(same float64 re-checks near ``eps``, same treatment of ties).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .certification import certify
from .eps import EpsValue, parse_single_eps
from .errors import CplCertError
from .lipschitz import LipschitzBounds
from .models import CPLNet
from .progress import OnProgress

PLACEHOLDER_EPS = 1.0
"""The radius handed to ``certify`` when the caller asks for none (without labels, certify
re-evaluates points only to decide their class; predictions and radii do not depend on it)."""


@dataclass
class PredictResult:
    """Per input (CPU tensors): predicted class, certified l2 radius, and ``radius > eps`` when ``eps`` was given."""

    predictions: torch.Tensor
    radii: torch.Tensor
    eps: EpsValue | None
    certified: torch.Tensor | None
    bounds: LipschitzBounds
    device: str
    seconds: float

    @property
    def n(self) -> int:
        return int(self.predictions.shape[0])


def predict(
    model: CPLNet,
    images: torch.Tensor,
    eps: float | str | EpsValue | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 1024,
    bounds: LipschitzBounds | None = None,
    on_progress: OnProgress | None = None,
) -> PredictResult:
    """Predicted class and certified radius of each image: ``images`` is (N, C, H, W) or one (C, H, W)
    image, uint8 pixels or floats in [0, 1] (the scale of the training data).

    With ``eps`` (a number or a string such as ``"36/255"``), ``certified[i]`` says whether the
    prediction provably stays the same within l2 distance ``eps`` of image ``i``. Every radius comes from a
    float64 evaluation (``tight_radii``) and holds for the exact function and for cpl-cert's float32 network;
    it lies below the exact radius by that network's rounding allowance only (about 1e-4 or less).
    ``on_progress(stage, done, total)`` follows ``certify``'s stages.
    """
    if not isinstance(images, torch.Tensor):
        raise CplCertError(f"predict needs a tensor of images, got {type(images).__name__}")
    if images.dim() == 3:
        images = images[None]
    eps_value = parse_single_eps(eps) if eps is not None else None
    result = certify(  # no labels: certify decides every point's class, re-evaluating where needed
        model, (images, None), eps=[eps_value or EpsValue(PLACEHOLDER_EPS, "placeholder")],
        device=device, batch_size=batch_size, bounds=bounds, on_progress=on_progress, tight_radii=True,
    )
    certified = result.radii > eps_value.value if eps_value is not None else None
    return PredictResult(result.predictions, result.radii, eps_value, certified, result.bounds, result.device, result.seconds)
