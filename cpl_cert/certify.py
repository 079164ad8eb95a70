"""Certified radii and accuracies of a data set: one float32 forward pass per image, batched on the device.

For logits ``f`` and a certified Lipschitz constant ``L_ij`` of each difference ``f_i - f_j``, the
prediction ``t`` cannot change within ``radius = min_{j != t} (f_t - f_j) / L_tj``. With a truncation
head ``L_tj = sqrt(2) L_body`` (the paper's ``margin / (sqrt(2) L)``); with an LLN head
``L_tj = ||w_t - w_j|| L_body``. Every radius carries a rigorous allowance for rounding
(``cpl_cert.radii``); points the float32 pass leaves undecided get their dense layers again in float64
(from the pass's own convolution outputs), then, if still undecided, a float64 evaluation throughout. See docs/certify.md and docs/math.md.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import ImageDataset
from .device import resolve_device
from .errors import CplCertError
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, float64_copy, weights_key
from .numerics import strict_math
from .progress import OnProgress, no_progress
from .radii import Enclosure, exact_enclosure, float32_pass, label_gap, tail_enclosure
from .rounding import ErrorModel, error_model
from .validate import validate_model


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
    """Per-sample results (CPU tensors) and the summary of one certification run.

    Two senses of "certified" (docs/certify.md): ``radii_exact`` bounds the radius of the exact
    function of the stored weights (what papers report; the counts at each eps are those of an exact
    evaluation), ``radii_float32`` that of the float32 network as cpl-cert runs it, and ``radii`` holds
    for both. ``predictions`` is the exact function's class (-1 where no class is certain: a tie, or
    non-finite logits); ``predictions_float32`` the float32 network's.
    """

    labels: torch.Tensor
    predictions: torch.Tensor
    predictions_float32: torch.Tensor
    margins: torch.Tensor
    radii: torch.Tensor
    radii_exact: torch.Tensor
    radii_float32: torch.Tensor
    eps: list[EpsValue]
    bounds: LipschitzBounds
    device: str
    seconds: float
    rechecked: int = 0
    undecided: int = 0
    nonfinite: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def correct_float32(self) -> torch.Tensor:
        return self.predictions_float32 == self.labels

    @property
    def clean_accuracy(self) -> float:
        return _fraction(self.correct)

    @property
    def clean_accuracy_float32(self) -> float:
        return _fraction(self.correct_float32)

    def certified_accuracy(self, eps: float) -> float:
        """Fraction of points the exact function classifies correctly with a radius above ``eps``."""
        return _fraction(self.correct & (self.radii_exact > eps))

    def certified_accuracy_float32(self, eps: float) -> float:
        """The same for the float32 network as cpl-cert runs it (margins deflated by its rounding bound)."""
        return _fraction(self.correct_float32 & (self.radii_float32 > eps))

    @property
    def certified(self) -> list[dict[str, Any]]:
        return [
            {"eps": e.value, "label": e.label, "accuracy": self.certified_accuracy(e.value),
             "accuracy_float32": self.certified_accuracy_float32(e.value)}
            for e in self.eps
        ]

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


def _fraction(mask: torch.Tensor) -> float:
    return float(mask.double().mean()) if mask.numel() else 0.0


def _as_tensors(data: ImageDataset | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, ImageDataset):
        return data.images, data.labels
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images, labels = data
        images = torch.as_tensor(images)
        if labels is None:  # no labels: every class is decided, no accuracy is meaningful
            return images, torch.full((images.shape[0] if images.dim() else 0,), -1, dtype=torch.long)
        return images, torch.as_tensor(labels)
    raise CplCertError("certify needs an ImageDataset or a pair (images, labels or None)")


def _check_images(images: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise CplCertError(f"images must be (N, C, H, W) with one label each, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise CplCertError(f"the images have shape {tuple(images.shape[1:])} but the model expects {tuple(input_shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise CplCertError(f"images must be uint8 pixels (0-255) or floats in [0, 1], not {images.dtype}")


# --- the whole run -------------------------------------------------------------------------------------------
def certify(
    model: CPLNet,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    eps: str | Sequence[str | float | EpsValue] | float = (0.1, 0.25, 0.5, 1.0),
    device: str | torch.device | None = "auto",
    batch_size: int = 1024,
    bounds: LipschitzBounds | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_progress: OnProgress | None = None,
) -> CertifyResult:
    """Certify every point of ``data``: predictions, margins, radii in both senses, and accuracies.

    The model is moved to ``device`` (in place, as ``nn.Module.to`` does); the data go there once;
    nothing syncs with the host per batch. ``progress(done, total)`` is called after each batch of
    the float32 pass. Points whose float32 evaluation cannot decide the exact function's answer at
    some eps (or its class) are evaluated again in float64 before they count (docs/certify.md).
    ``on_progress(stage, done, total)`` follows every stage in points: ``"float32"`` (all points; it
    includes re-running the dense layers in float64 for the points it leaves undecided), then
    ``"float64"`` (the points still undecided, when there are any).
    """
    with torch.inference_mode(), strict_math():
        result = _certify(model, data, eps, device, batch_size, bounds, progress, on_progress)
    # Inference tensors cannot enter autograd (an attack on the certified points would fail): clone out.
    for name in ("labels", "predictions", "predictions_float32", "margins", "radii", "radii_exact", "radii_float32"):
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
    on_progress: OnProgress | None = None,
) -> CertifyResult:
    if batch_size < 1:
        raise CplCertError(f"--batch-size must be positive, got {batch_size}")
    eps_values = parse_eps(eps)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    images, labels = _as_tensors(data)
    _check_images(images, labels, model.config.input_shape)
    bounds, model_err = certificate_constants(model, bounds)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    images_dev, labels_dev = images.to(dev, non_blocking=True), labels.to(dev).long()
    eps_tensor = torch.tensor([e.value for e in eps_values], dtype=torch.float64, device=dev)
    exact = _Exact(model, model_err)
    run = _float32_run(exact, images_dev, labels_dev, eps_tensor, batch_size, progress, on_progress)
    _float64_run(exact, images_dev, labels_dev, eps_tensor, run, batch_size, on_progress)
    rechecked = exact.rechecked
    left = _undecided(run, labels_dev, eps_tensor)
    result = _result(run, labels_dev, eps_values, bounds, str(dev))
    result.rechecked, result.undecided = rechecked, int(left.sum())
    result.nonfinite = int((~run["finite"]).sum())
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class _Exact:
    """What the re-evaluations share: the model, its float64 copy (made on first need), its rounding
    constants, the first dense stage (where float64 takes over first) and the points re-evaluated."""

    model: CPLNet
    model_err: ErrorModel
    model64: CPLNet | None = None
    rechecked: int = 0

    @property
    def dense_start(self) -> int:
        return next(i for i, (name, _) in enumerate(self.model.body()) if name == "flatten")

    def copy64(self) -> CPLNet:
        if self.model64 is None:
            self.model64 = float64_copy(self.model)
        return self.model64


def _float32_run(
    exact: _Exact, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor, batch_size: int,
    progress: Callable[[int, int], None] | None, on_progress: OnProgress | None = None,
) -> dict[str, torch.Tensor]:
    """The float32 pass over all points, batch by batch, concatenated. A point it leaves undecided gets
    its dense layers again in float64 at once, from the batch's float32 convolution outputs."""
    total = images.shape[0]
    report = on_progress or no_progress
    report("float32", 0, total)
    parts, split = [], exact.dense_start
    for begin in range(0, total, batch_size):
        part = slice(begin, begin + batch_size)
        run, point = float32_pass(exact.model, exact.model_err, images[part], labels[part], split)
        todo = _undecided(run, labels[part], eps).nonzero().flatten()
        if todo.numel():
            _store(run, todo, tail_enclosure(exact.copy64(), exact.model_err, point.rows(todo)), labels[part][todo])
            exact.rechecked += int(todo.numel())
        parts.append(run)
        if progress is not None:
            progress(min(begin + batch_size, total), total)
        report("float32", min(begin + batch_size, total), total)
    if not parts:
        parts.append(float32_pass(exact.model, exact.model_err, images[:0], labels[:0], split)[0])
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _store(run: dict[str, torch.Tensor], index: torch.Tensor, enclosure: Enclosure, labels: torch.Tensor) -> None:
    """Replace the answers of the points ``index`` by those of a tighter evaluation."""
    for key in ("top", "low", "high", "margin", "finite"):
        run[key][index] = getattr(enclosure, key)
    run["label_gap"][index] = label_gap(enclosure, labels)


def _undecided(run: dict[str, torch.Tensor], labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Points whose evaluation so far leaves an answer open: non-finite values; a class that is not
    certain while the label is one of the candidates (or no label is given: -1); a correctly classified
    point whose exact radius may lie on either side of some eps. A point whose candidate classes all
    differ from its label is an error whatever its exact class, and counts at no eps."""
    low, high = run["low"][:, None], run["high"][:, None]
    straddles = ((low <= eps) & (high > eps)).any(dim=1)
    label_possible = (labels < 0) | (run["label_gap"] <= 0)
    return ~run["finite"] | ((run["low"] <= 0) & label_possible) | (straddles & (run["top"] == labels))


def _float64_run(
    exact: _Exact, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor,
    run: dict[str, torch.Tensor], batch_size: int, on_progress: OnProgress | None = None,
) -> None:
    """Evaluate in float64 throughout the points still undecided; updates ``run`` in place."""
    todo = _undecided(run, labels, eps).nonzero().flatten()
    if todo.numel() == 0:
        return
    report = on_progress or no_progress
    report("float64", 0, todo.numel())
    for begin in range(0, todo.numel(), batch_size):
        part = todo[begin : begin + batch_size]
        _store(run, part, exact_enclosure(exact.copy64(), exact.model_err, images[part]), labels[part])
        report("float64", min(begin + batch_size, todo.numel()), todo.numel())


def _result(run: dict[str, torch.Tensor], labels: torch.Tensor, eps: list[EpsValue], bounds: LipschitzBounds, device: str) -> CertifyResult:
    """Per-sample answers: the exact class where certain, radii in both senses and the radius valid for both."""
    decided = run["finite"] & (run["low"] > 0)
    prediction = torch.where(decided, run["top"], torch.full_like(run["top"], -1))
    exact = torch.where(decided, run["low"], torch.zeros_like(run["low"]))
    float32 = run["radius32"]
    agree = decided & (run["prediction32"] == prediction)
    both = torch.where(agree, torch.minimum(exact, float32), torch.zeros_like(exact))
    margin = torch.where(run["finite"], run["margin"], torch.full_like(run["margin"], math.nan))
    return CertifyResult(
        labels=labels.cpu(), predictions=prediction.cpu(), predictions_float32=run["prediction32"].cpu(),
        margins=margin.cpu(), radii=both.cpu(), radii_exact=exact.cpu(), radii_float32=float32.cpu(),
        eps=eps, bounds=bounds, device=device, seconds=0.0,
    )


def certificate_constants(model: CPLNet, bounds: LipschitzBounds | None = None) -> tuple[LipschitzBounds, ErrorModel]:
    """The model's certified bounds and rounding constants; computed once per set of weights and cached
    on the model (any in-place change of a parameter or buffer invalidates the cache)."""
    key = weights_key(model)
    cached = model.__dict__.get("_certificate_constants")
    if bounds is None and cached is not None and cached[0] == key:
        return cached[1], cached[2]
    validate_model(model)
    given = bounds is not None
    bounds = bounds if given else lipschitz_bounds(model)
    model_err = error_model(model, bounds)
    if not given:
        model.__dict__["_certificate_constants"] = (key, bounds, model_err)
    return bounds, model_err
