"""Radii from a forward pass: what one evaluation proves about the exact logits, and the float32 radius.

An evaluation of the body (float32, or partly or wholly float64) with its rounding bound
(``cpl_cert.rounding``) gives, per point, an *enclosure*: the class with the largest logit, the gaps to
the others, and a bound of how far each gap can be from the exact function's. From it follow bounds of
the exact radius, and, for the float32 pass, the radius within which the float32 network's own
prediction provably stays (docs/math.md, section 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models import CPLNet
from .numerics import FP64_SLACK, norm_upper, unit_roundoff
from .rounding import (
    BodyTrace,
    ErrorModel,
    ball_body_error,
    body_error,
    exact_head_logits,
    float32_head_error,
    trace_body,
)


# --- inputs ------------------------------------------------------------------------------------------------
def as_points(images: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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
    return as_points(images, torch.float64)[0]


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


def enclose(center: torch.Tensor, head_error: torch.Tensor, body_error: torch.Tensor, model_err: ErrorModel) -> Enclosure:
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
@dataclass
class SplitPoint:
    """A float32 pass seen at body stage ``split``: the activation entering it, the norms measured
    before it, and the bound of each input's distance to the exact point it stands for."""

    split: int
    activation: torch.Tensor
    first: BodyTrace
    delta: torch.Tensor

    def rows(self, index: torch.Tensor) -> SplitPoint:
        """The same for the points ``index`` only."""
        first = BodyTrace({k: v[index] for k, v in self.first.inputs.items()}, {k: v[index] for k, v in self.first.hidden.items()},
                          self.first.features[index])
        return SplitPoint(self.split, self.activation[index], first, self.delta[index])


def float32_pass(
    model: CPLNet, model_err: ErrorModel, images: torch.Tensor, labels: torch.Tensor, split: int = 0
) -> tuple[dict[str, torch.Tensor], SplitPoint]:
    """The float32 network as deployed, with its rounding bound: exact-radius bounds and the float32 radius.

    Also returns the pass as seen at body stage ``split``, from which ``tail_enclosure`` re-runs the
    later stages in float64 without repeating the earlier ones.
    """
    x, delta = as_points(images, torch.float32)
    head, first = trace_body(model, x, 0, split)
    features, rest = trace_body(model, head, split)
    trace = BodyTrace({**first.inputs, **rest.inputs}, {**first.hidden, **rest.hidden}, rest.features)
    logits32 = model.head(features)
    error = body_error(model_err, trace, [torch.float32] * len(model_err.stages))
    center, head_error = exact_head_logits(model_err, features)
    enclosure = enclose(center, head_error, error + model_err.body_lipschitz * delta, model_err)
    prediction32 = float32_prediction(logits32)
    finite32 = (prediction32 >= 0) & enclosure.finite
    radius32 = _float32_radius(model_err, trace, enclosure, delta)
    valid = finite32 & (prediction32 == enclosure.top) & (enclosure.low > 0)
    run = {
        "top": enclosure.top, "low": enclosure.low, "high": enclosure.high, "margin": enclosure.margin,
        "finite": enclosure.finite, "prediction32": prediction32, "label_gap": label_gap(enclosure, labels),
        "radius32": torch.where(valid, radius32.clamp_min(0.0), torch.zeros_like(radius32)),
    }
    return run, SplitPoint(split, head, first, delta)


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


def exact_enclosure(model64: CPLNet, model_err: ErrorModel, images: torch.Tensor) -> Enclosure:
    """Bounds of the exact radius from a float64 evaluation throughout (about a hundred million times
    tighter than float32)."""
    x, delta = as_points(images, torch.float64)
    return tail_enclosure(model64, model_err, SplitPoint(0, x, BodyTrace({}, {}, norm_upper(x)), delta))


def tail_enclosure(model64: CPLNet, model_err: ErrorModel, point: SplitPoint) -> Enclosure:
    """Bounds of the exact radius when the stages before ``point.split`` ran in float32 as traced in
    ``point`` and the rest run now in float64 (``model64``). Keeping the float32 convolutions and removing
    the rounding of the dense layers, which sum hundreds of terms per output, decides most points cheaply."""
    features, trace = trace_body(model64, point.activation.double(), point.split)
    trace.inputs.update(point.first.inputs)
    trace.hidden.update(point.first.hidden)
    dtypes = [torch.float32] * point.split + [torch.float64] * (len(model_err.stages) - point.split)
    error = body_error(model_err, trace, dtypes)
    center, head_error = exact_head_logits(model_err, features)
    return enclose(center, head_error, error + model_err.body_lipschitz * point.delta, model_err)


def label_gap(enclosure: Enclosure, labels: torch.Tensor) -> torch.Tensor:
    """Lower bound of the exact ``f_top - f_label`` (0 when the label is the top class, -1 without a label)."""
    gap = (enclosure.gap - enclosure.error).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    gap = torch.where(labels == enclosure.top, torch.zeros_like(gap), gap)
    return torch.where(labels < 0, torch.full_like(gap, -1.0), gap)
