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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import ImageDataset
from .device import resolve_device
from .errors import CplCertError
from .lipschitz import LipschitzBounds, lipschitz_bounds
from .models import CPLNet, float64_copy, weights_key
from .numerics import FP64_SLACK, norm_upper, strict_math, unit_roundoff
from .progress import OnProgress, no_progress
from .rounding import (
    BodyTrace,
    ErrorModel,
    ball_body_error,
    body_error,
    error_model,
    exact_head_logits,
    float32_head_error,
    trace_body,
)
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


# --- inputs --------------------------------------------------------------------------------------------
def _as_dtype(images: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, delta)``: the images as ``dtype`` (uint8 pixels / 255) and a per-sample bound of the distance
    from ``x`` to the exact point they stand for (the uint8 value / 255, or the given float tensor)."""
    if images.dtype == torch.uint8:
        x = images.to(dtype).div_(255.0)
        return x, norm_upper(x) * (unit_roundoff(dtype) / (1.0 - unit_roundoff(dtype)))
    x = images.to(dtype)
    if images.dtype == dtype or (images.dtype == torch.float32 and dtype == torch.float64):
        return x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return x, norm_upper(x.double() - images.double())


def exact_points(images: torch.Tensor) -> torch.Tensor:
    """The points the images stand for, in float64: uint8 pixels / 255, or the given floats."""
    return _as_dtype(images, torch.float64)[0]


# --- radii from an enclosure of the logits --------------------------------------------------------------
@dataclass
class Enclosure:
    """What one evaluation proves about the exact logits at a batch of points."""

    top: torch.Tensor  # (B,) class of the largest centre logit
    gap: torch.Tensor  # (B, K) centre_top - centre_j
    error: torch.Tensor  # (B, K) bound of |exact gap - gap| (0 at the top class)
    low: torch.Tensor  # (B,) lower bound of the exact radius (<= 0: the exact class is not certain)
    high: torch.Tensor  # (B,) upper bound of the exact radius (when the exact class is ``top``)
    margin: torch.Tensor  # (B,) centre top minus centre second
    finite: torch.Tensor  # (B,) bool


def _enclose(center: torch.Tensor, head_error: torch.Tensor, body_error: torch.Tensor, model_err: ErrorModel) -> Enclosure:
    """Radius bounds from centre logits, their per-logit head error and the body error (in feature norm)."""
    pair = model_err.pair_lipschitz.to(center.device)
    finite = torch.isfinite(center).all(dim=1) & torch.isfinite(body_error)
    center = torch.where(finite[:, None], center, torch.zeros_like(center))
    body_error = torch.where(finite, body_error, torch.zeros_like(body_error))
    top = center.argmax(dim=1)
    centre_top = center.gather(1, top[:, None])
    gap = centre_top - center
    pair_top = pair[top]  # (B, K)
    ratio = model_err.head_pairs.to(center.device)[top]  # c_tj: how a feature error moves f_t - f_j
    error = head_error.gather(1, top[:, None]) + head_error + ratio * body_error[:, None]
    error = (error + (centre_top.abs() + center.abs()) * unit_roundoff(torch.float64)) * (1.0 + FP64_SLACK)
    error.scatter_(1, top[:, None], 0.0)
    low = _min_other(_round_down((gap - error) / pair_top), top)
    high = _min_other(_round_up_t((gap + error) / pair_top), top)
    margin = _min_other(gap, top)
    low = torch.where(finite, low, torch.full_like(low, -math.inf))
    return Enclosure(top, gap, error, low, high, margin, finite)


def _min_other(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Row-wise minimum over the columns other than ``top``."""
    return values.scatter(1, top[:, None], math.inf).min(dim=1).values


def _round_down(values: torch.Tensor) -> torch.Tensor:
    return values - values.abs() * FP64_SLACK


def _round_up_t(values: torch.Tensor) -> torch.Tensor:
    return values + values.abs() * FP64_SLACK


# --- the three evaluations ----------------------------------------------------------------------------------
def _float32_pass(model: CPLNet, model_err: ErrorModel, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float32 network as deployed, with its rounding bound: exact-radius bounds and the float32 radius."""
    x, delta = _as_dtype(images, torch.float32)
    features, trace = trace_body(model, x)
    logits32 = model.head(features)
    error = body_error(model_err, trace, [torch.float32] * len(model_err.stages))
    center, head_error = exact_head_logits(model_err, features)
    enclosure = _enclose(center, head_error, error + model_err.body_lipschitz * delta, model_err)
    prediction32 = float32_prediction(logits32)
    finite32 = (prediction32 >= 0) & enclosure.finite
    radius32 = _float32_radius(model_err, trace, enclosure, delta)
    valid = finite32 & (prediction32 == enclosure.top) & (enclosure.low > 0)
    return {
        "top": enclosure.top, "low": enclosure.low, "high": enclosure.high, "margin": enclosure.margin,
        "finite": enclosure.finite, "prediction32": prediction32, "label_gap": _label_gap(enclosure, labels),
        "radius32": torch.where(valid, radius32.clamp_min(0.0), torch.zeros_like(radius32)),
    }


def float32_prediction(logits: torch.Tensor) -> torch.Tensor:
    """The float32 network's class: the largest logit, or -1 on a tie for the top or non-finite logits."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    top2 = logits.topk(2, dim=1)
    clear = torch.isfinite(logits).all(dim=1) & (top2.values[:, 0] > top2.values[:, 1])
    return torch.where(clear, top2.indices[:, 0], torch.full_like(top2.indices[:, 0], -1))


def _float32_radius(model_err: ErrorModel, trace: BodyTrace, enclosure: Enclosure, delta: torch.Tensor) -> torch.Tensor:
    """Radius within which the float32 network's prediction provably stays ``top`` (docs/math.md 6.4)."""
    reach = torch.where(torch.isfinite(enclosure.high), enclosure.high, torch.zeros_like(enclosure.high)).clamp_min(0.0)
    ball_error, features_norm = ball_body_error(model_err, trace, torch.float32, reach + delta)
    head = float32_head_error(model_err, features_norm)
    head_pairs = head.gather(1, enclosure.top[:, None]) + head
    pair = model_err.pair_lipschitz.to(head.device)[enclosure.top]
    slack = _round_down((enclosure.gap - enclosure.error - head_pairs) / pair)
    radius = _min_other(slack, enclosure.top) - _round_up_t(ball_error / model_err.body_lipschitz)
    return _round_down(torch.where(torch.isfinite(radius), radius, torch.full_like(radius, -1.0)))


def exact_enclosure(model: CPLNet, model64: CPLNet, model_err: ErrorModel, images: torch.Tensor, split: int) -> Enclosure:
    """Bounds of the exact radius from body stages ``:split`` in float32 and the rest in float64.

    ``split = 0`` is a float64 evaluation throughout (about a hundred million times tighter than
    float32); a later split keeps the cheap float32 convolutions and removes the rounding of the
    stages after it (the dense layers hold most of it: they sum hundreds of terms per output).
    """
    dtype = torch.float64 if split == 0 else torch.float32
    x, delta = _as_dtype(images, dtype)
    head, first = trace_body(model64 if split == 0 else model, x, 0, split)
    features, trace = trace_body(model64, head.double(), split)
    trace.inputs.update(first.inputs)
    trace.hidden.update(first.hidden)
    dtypes = [torch.float32] * split + [torch.float64] * (len(model_err.stages) - split)
    error = body_error(model_err, trace, dtypes)
    center, head_error = exact_head_logits(model_err, features)
    return _enclose(center, head_error, error + model_err.body_lipschitz * delta, model_err)


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
    ``on_progress(stage, done, total)`` follows every stage in points: ``"float32"`` (all points),
    then ``"float64-dense"`` and ``"float64"`` (the points re-evaluated, when there are any).
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
    run = _float32_run(model, model_err, images_dev, labels_dev, batch_size, progress, on_progress)
    eps_tensor = torch.tensor([e.value for e in eps_values], dtype=torch.float64, device=dev)
    rechecked = _exact_runs(model, model_err, images_dev, labels_dev, eps_tensor, run, batch_size, on_progress)
    left = _undecided(run, labels_dev, eps_tensor)
    result = _result(run, labels_dev, eps_values, bounds, str(dev))
    result.rechecked, result.undecided = rechecked, int(left.sum())
    result.nonfinite = int((~run["finite"]).sum())
    result.seconds = time.perf_counter() - start
    return result


def _float32_run(
    model: CPLNet, model_err: ErrorModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
    progress: Callable[[int, int], None] | None, on_progress: OnProgress | None = None,
) -> dict[str, torch.Tensor]:
    """The float32 pass over all points, batch by batch, concatenated."""
    total = images.shape[0]
    report = on_progress or no_progress
    report("float32", 0, total)
    parts = []
    for begin in range(0, total, batch_size):
        part = slice(begin, begin + batch_size)
        parts.append(_float32_pass(model, model_err, images[part], labels[part]))
        if progress is not None:
            progress(min(begin + batch_size, total), total)
        report("float32", min(begin + batch_size, total), total)
    if not parts:
        parts.append(_float32_pass(model, model_err, images[:0], labels[:0]))
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _undecided(run: dict[str, torch.Tensor], labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Points whose evaluation so far leaves an answer open: non-finite values; a class that is not
    certain while the label is one of the candidates (or no label is given: -1); a correctly classified
    point whose exact radius may lie on either side of some eps. A point whose candidate classes all
    differ from its label is an error whatever its exact class, and counts at no eps."""
    low, high = run["low"][:, None], run["high"][:, None]
    straddles = ((low <= eps) & (high > eps)).any(dim=1)
    label_possible = (labels < 0) | (run["label_gap"] <= 0)
    return ~run["finite"] | ((run["low"] <= 0) & label_possible) | (straddles & (run["top"] == labels))


def _label_gap(enclosure: Enclosure, labels: torch.Tensor) -> torch.Tensor:
    """Lower bound of the exact ``f_top - f_label`` (0 when the label is the top class, -1 without a label)."""
    gap = (enclosure.gap - enclosure.error).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    gap = torch.where(labels == enclosure.top, torch.zeros_like(gap), gap)
    return torch.where(labels < 0, torch.full_like(gap, -1.0), gap)


def _exact_runs(
    model: CPLNet, model_err: ErrorModel, images: torch.Tensor, labels: torch.Tensor, eps: torch.Tensor,
    run: dict[str, torch.Tensor], batch_size: int, on_progress: OnProgress | None = None,
) -> int:
    """Evaluate undecided points more precisely until decided: float64 dense layers first (cheap), then
    float64 throughout; updates ``run`` in place and returns how many points were re-evaluated."""
    index = _undecided(run, labels, eps).nonzero().flatten()
    if index.numel() == 0:
        return 0
    report = on_progress or no_progress
    model64 = float64_copy(model)
    dense_start = next(i for i, (name, _) in enumerate(model.body()) if name == "flatten")
    for split, stage in ((dense_start, "float64-dense"), (0, "float64")):
        todo = index[_undecided(run, labels, eps)[index]]
        if todo.numel():
            report(stage, 0, todo.numel())
        for begin in range(0, todo.numel(), batch_size):
            part = todo[begin : begin + batch_size]
            enclosure = exact_enclosure(model, model64, model_err, images[part], split)
            for key in ("top", "low", "high", "margin", "finite"):
                run[key][part] = getattr(enclosure, key)
            run["label_gap"][part] = _label_gap(enclosure, labels[part])
            report(stage, min(begin + batch_size, todo.numel()), todo.numel())
    return int(index.numel())


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
