"""Certified radii and accuracies: one forward pass per image, batched on the device.

For logits ``f`` and a certified Lipschitz constant ``L_ij`` of each difference ``f_i - f_j``, the
prediction ``t`` cannot change within ``radius = min_{j != t} (f_t - f_j) / L_tj``. With a truncation
head ``L_tj = sqrt(2) L_body`` (the paper's ``margin / (sqrt(2) L)``); with an LLN head
``L_tj = ||w_t - w_j|| L_body``. See docs/math.md.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import ImageDataset, to_float_images
from .device import resolve_device
from .errors import CplCertError
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, float64_copy

BORDERLINE_RTOL = 1e-4
"""Radii within this relative distance of an ``eps`` are recomputed in float64 before they count."""

CALIBRATION_SAMPLES = 16
"""At most this many points (one per ``CALIBRATION_EVERY``; none in shorter runs) are run through the
float64 copy to measure the float32 rounding error of radii; float64 runs ~10-30x slower than float32
on a CPU, so this keeps the calibration to a few percent of the run."""

CALIBRATION_EVERY = 500

CALIBRATION_SAFETY = 10.0
"""The re-check window is at least this many times the measured float32 error of radii (and margins)."""


@dataclass
class EpsValue:
    """A radius to certify at, with the label the user wrote (``36/255`` or ``0.25``)."""

    value: float
    label: str


def parse_eps(spec: str | float | Sequence[str | float | EpsValue]) -> list[EpsValue]:
    """Parse ``"0.1,0.25,36/255"`` (or a list of numbers, strings or ``EpsValue``) into positive radii."""
    items: Sequence[str | float | EpsValue]
    if isinstance(spec, str):
        items = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    values: list[EpsValue] = []
    for item in items:
        if isinstance(item, EpsValue):
            value, label = float(item.value), item.label
        elif isinstance(item, (int, float)):
            value, label = float(item), f"{float(item):g}"
        else:
            match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*", item)
            if not match:
                raise CplCertError(f"cannot read eps {item!r}; write numbers like 0.25 or fractions like 36/255, separated by commas")
            denominator = float(match.group(2)) if match.group(2) else 1.0
            if denominator == 0:
                raise CplCertError(f"cannot read eps {item!r}: division by zero")
            value = float(match.group(1)) / denominator
            label = item.strip().replace(" ", "")
        if not math.isfinite(value) or value <= 0:
            raise CplCertError(f"eps must be positive and finite, got {item!r}")
        values.append(EpsValue(value, label))
    if not values:
        raise CplCertError("give at least one eps")
    return values


@dataclass
class CertifyResult:
    """Per-sample results (CPU tensors) and the summary of one certification run."""

    labels: torch.Tensor
    predictions: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor
    eps: list[EpsValue]
    bounds: LipschitzBounds
    device: str
    seconds: float
    rechecked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.double().mean()) if self.n else 0.0

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of points correctly classified AND with ``radius > eps``."""
        return float((self.correct & (self.radii > eps)).double().mean()) if self.n else 0.0

    @property
    def certified(self) -> list[dict[str, Any]]:
        return [{"eps": e.value, "label": e.label, "accuracy": self.certified_accuracy(e.value)} for e in self.eps]

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def _as_tensors(data: ImageDataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, ImageDataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        return torch.as_tensor(images), torch.as_tensor(labels)
    raise CplCertError("certify needs an ImageDataset or a pair (images, labels)")


def radii_from_logits(logits: torch.Tensor, pair_lipschitz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(predictions, margins, radii)`` in float64 from logits and the class-pair Lipschitz matrix.

    ``margins`` is ``f_top - f_second``; ``radii`` is ``min_j (f_top - f_j) / L[top, j]``. A pair whose
    difference is constant (``L[top, j] == 0``, e.g. two identical LLN rows) never changes: it bounds
    nothing when the gap is positive and gives radius 0 on a tie.
    """
    logits = logits.double()
    predictions = logits.argmax(dim=1)
    top = logits.gather(1, predictions[:, None])
    gaps = top - logits  # (B, K), zero at the prediction
    pair = pair_lipschitz.to(logits.device, torch.float64)[predictions]  # (B, K)
    ratios = torch.where(pair > 0, gaps / pair, torch.where(gaps > 0, math.inf, 0.0))
    ratios.scatter_(1, predictions[:, None], math.inf)
    radii = ratios.min(dim=1).values.clamp_min(0.0)
    gaps.scatter_(1, predictions[:, None], math.inf)
    margins = gaps.min(dim=1).values
    return predictions, margins, radii


def _float64_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels straight to float64 in [0, 1] (not through float32, whose rounding would move the point)."""
    return images.double() / 255.0 if images.dtype == torch.uint8 else images.double()


def certify(
    model: CPLNet,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    eps: str | Sequence[str | float | EpsValue] | float = (0.1, 0.25, 0.5, 1.0),
    device: str | torch.device | None = "auto",
    batch_size: int = 1024,
    bounds: LipschitzBounds | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CertifyResult:
    """Certify every point of ``data``: predictions, margins and radii in float64, and accuracies.

    The model is moved to ``device`` (in place, as ``nn.Module.to`` does); the data go there once;
    nothing syncs with the host per batch. ``progress(done, total)`` is called after each batch
    (without a sync, so on a GPU it counts batches queued). Radii close to an ``eps`` are recomputed
    with a float64 copy of the model before they count (see ``_recheck_tolerance``).
    """
    with torch.inference_mode():
        result = _certify(model, data, eps, device, batch_size, bounds, progress)
    # Inference tensors cannot enter autograd (an attack on the certified points would fail): clone out.
    for name in ("labels", "predictions", "margins", "radii"):
        setattr(result, name, getattr(result, name).clone())
    return result


def _certify(
    model: CPLNet,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    eps: str | Sequence[str | float | EpsValue] | float,
    device: str | torch.device | None,
    batch_size: int,
    bounds: LipschitzBounds | None,
    progress: Callable[[int, int], None] | None,
) -> CertifyResult:
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    eps_values = parse_eps(eps)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    if bounds is None:
        bounds = lipschitz_bounds(model)
    pair = bounds.pair_lipschitz().to(dev)
    images, labels = _as_tensors(data)
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise CplCertError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if tuple(images.shape[1:]) != tuple(model.config.input_shape):
        raise CplCertError(f"the images have shape {tuple(images.shape[1:])} but the model expects {tuple(model.config.input_shape)}")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    images_dev = images.to(dev, non_blocking=True)
    total = images_dev.shape[0]
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for begin in range(0, total, batch_size):
        x = to_float_images(images_dev[begin : begin + batch_size])
        chunks.append(radii_from_logits(model(x), pair))
        if progress is not None:
            progress(min(begin + batch_size, total), total)
    if chunks:
        predictions, margins, radii = (torch.cat(parts) for parts in zip(*chunks))
    else:
        predictions = torch.empty(0, dtype=torch.long, device=dev)
        margins = radii = torch.empty(0, dtype=torch.float64, device=dev)

    exact_models: list[nn.Module] = []  # built on first use

    def exact(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not exact_models:
            exact_models.append(float64_copy(model))
        return radii_from_logits(exact_models[0](_float64_images(images_dev[index])), pair)

    # Calibrate: the float32 rounding error of radii and margins, measured on the first few points
    # (runs shorter than CALIBRATION_EVERY points use the fixed relative window alone).
    radius_error = margin_error = 0.0
    probes = min(CALIBRATION_SAMPLES, total // CALIBRATION_EVERY)
    if probes:
        probe = torch.arange(probes, device=dev)
        p64, m64, r64 = exact(probe)
        same = p64 == predictions[probe]
        if bool(same.any()):
            radius_error = float((r64 - radii[probe])[same].abs().max())
            margin_error = float((m64 - margins[probe])[same].abs().max())
        predictions[probe], margins[probe], radii[probe] = p64, m64, r64
    eps_tensor = torch.tensor([e.value for e in eps_values], dtype=torch.float64, device=dev)
    tolerance = torch.clamp(BORDERLINE_RTOL * eps_tensor, min=CALIBRATION_SAFETY * radius_error)
    borderline = ((radii[:, None] - eps_tensor).abs() <= tolerance).any(dim=1)
    # Near-ties: the float32 argmax itself may be wrong.
    borderline |= margins <= max(1e-6 * bounds.upper, CALIBRATION_SAFETY * margin_error)
    index = borderline.nonzero().flatten()
    for begin in range(0, index.numel(), batch_size):
        part = index[begin : begin + batch_size]
        predictions[part], margins[part], radii[part] = exact(part)
    # The per-sample tensors leave as ordinary CPU tensors (see ``certify``), not inference tensors.
    result = CertifyResult(
        labels=labels.cpu().long(),
        predictions=predictions.cpu(),
        margins=margins.cpu(),
        radii=radii.cpu(),
        eps=eps_values,
        bounds=bounds,
        device=str(dev),
        seconds=0.0,
        rechecked=int(index.numel()),
        extra={"float32_radius_error": radius_error, "float32_margin_error": margin_error},
    )
    result.seconds = time.perf_counter() - start
    return result
