"""Radii from a forward pass: what one evaluation proves about the exact logits, and about the float32 networks.

An evaluation of the body (float32 convolutions with float64 dense layers, or float64 throughout) with
its rounding bound (``cpl_cert.rounding``) gives, per point, an *enclosure*: the class with the largest
logit, the gaps to the others, and a bound of how far each gap can be from the exact function's. From it
follow bounds of the exact radius and, for each float32 network whose rounding is bounded (cpl-cert's,
with float64 accumulation, and any correctly rounded float32 runtime), the radius within which that
network's own prediction provably stays (docs/math.md, section 6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from .numerics import FLOAT32, FLOAT32_ACC64, FLOAT64, FP64_SLACK, Arithmetic, norm_upper, unit_roundoff
from .passes import trace_body
from .rounding import BodyTrace, ErrorModel, ball_body_error, body_error, exact_head_logits, head_error

UNKNOWN = -2
"""A float32 network's class that no evaluation so far proves (cpl-cert runs that network to find it)."""


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


def enclose(center: torch.Tensor, head_error: torch.Tensor, body_error: torch.Tensor, constants: ErrorModel) -> Enclosure:
    """Radius bounds from centre logits, their per-logit head error and the body error (in feature norm).

    The float64 subtraction ``centre_top - centre_j`` is off by at most ``u (|centre_top| + |centre_j|)``
    (a subtraction whose result underflows is exact, so no absolute term is needed).
    """
    pair = constants.pair_lipschitz.to(center.device)
    finite = torch.isfinite(center).all(dim=1) & torch.isfinite(body_error)
    center = torch.where(finite[:, None], center, torch.zeros_like(center))
    body_error = torch.where(finite, body_error, torch.zeros_like(body_error))
    top = center.argmax(dim=1)
    centre_top = center.gather(1, top[:, None])
    gap = centre_top - center
    pair_top = pair[top]  # (B, K)
    ratio = constants.head_pairs.to(center.device)[top]  # c_tj: how a feature error moves f_t - f_j
    error = head_error.gather(1, top[:, None]) + head_error + ratio * body_error[:, None]
    error = (error + (centre_top.abs() + center.abs()) * unit_roundoff(torch.float64)) * (1.0 + FP64_SLACK)
    error.scatter_(1, top[:, None], 0.0)
    low = _min_other(_round_down((gap - error) / pair_top), top)
    high = _min_other(_round_up((gap + error) / pair_top), top)
    margin = _min_other(gap, top)
    low = torch.where(finite, low, torch.full_like(low, -math.inf))
    return Enclosure(top, gap, error, low, high, margin, finite)


def _min_other(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Row-wise minimum over the columns other than ``top``."""
    return values.scatter(1, top[:, None], math.inf).min(dim=1).values


def _round_down(values: torch.Tensor) -> torch.Tensor:
    return values - values.abs() * FP64_SLACK


def _round_up(values: torch.Tensor) -> torch.Tensor:
    return values + values.abs() * FP64_SLACK


def network_radius(
    constants: ErrorModel, trace: BodyTrace, here: Sequence[Arithmetic], there: Sequence[Arithmetic], enclosure: Enclosure,
    delta: torch.Tensor,
) -> torch.Tensor:
    """Radius within which the float32 network computing in the arithmetic ``there`` provably predicts
    ``enclosure.top`` (docs/math.md 6.4); the enclosure and ``trace`` come from a pass in the arithmetic ``here``.

    The network's radius never exceeds the exact radius, whose upper bound is ``enclosure.high``, so the
    rounding error is bounded over the ball of that radius (plus the input's own rounding ``delta``).
    """
    reach = torch.where(torch.isfinite(enclosure.high), enclosure.high, torch.zeros_like(enclosure.high)).clamp_min(0.0)
    ball_error, features_norm = ball_body_error(constants, trace, here, there, reach + delta)
    head_errors = head_error(constants, features_norm, there[-1])
    head_pairs = head_errors.gather(1, enclosure.top[:, None]) + head_errors
    pair = constants.pair_lipschitz.to(head_errors.device)[enclosure.top]
    slack = _round_down((enclosure.gap - enclosure.error - head_pairs) / pair)
    radius = _min_other(slack, enclosure.top) - _round_up(ball_error / constants.body_lipschitz)
    return _round_down(torch.where(torch.isfinite(radius), radius, torch.full_like(radius, -1.0)))


def label_gap(enclosure: Enclosure, labels: torch.Tensor) -> torch.Tensor:
    """Lower bound of the exact ``f_top - f_label`` (0 when the label is the top class, -1 without a label)."""
    gap = (enclosure.gap - enclosure.error).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    gap = torch.where(labels == enclosure.top, torch.zeros_like(gap), gap)
    return torch.where(labels < 0, torch.full_like(gap, -1.0), gap)


# --- what the evaluations so far prove --------------------------------------------------------------------
@dataclass
class Answers:
    """Per point (tensors of one length): the exact radius's bounds, and each float32 network's class and radius."""

    top: torch.Tensor  # class of the largest logit of the evaluation
    low: torch.Tensor  # lower bound of the exact radius (<= 0: the exact class is not certain)
    high: torch.Tensor  # upper bound of the exact radius
    margin: torch.Tensor  # the evaluation's top logit minus the second
    finite: torch.Tensor  # bool: the evaluation's values are finite
    label_gap: torch.Tensor  # lower bound of exact f_top - f_label (``label_gap``)
    prediction32: torch.Tensor  # cpl-cert's float32 network's class (UNKNOWN: not proven yet, -1: a tie or non-finite)
    radius32: torch.Tensor  # its certified radius
    prediction_any: torch.Tensor  # the class every correctly rounded float32 runtime computes (-1: not proven)
    radius_any: torch.Tensor  # the radius within which each of them keeps it
    float64: torch.Tensor  # bool: evaluated in float64 throughout

    def take(self, index: torch.Tensor, other: Answers) -> None:
        """Replace the answers of the points ``index`` by ``other``'s (a tighter evaluation of those points)."""
        for f in fields(self):
            getattr(self, f.name)[index] = getattr(other, f.name)

    @staticmethod
    def cat(parts: list[Answers]) -> Answers:
        return Answers(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Answers)})


def assess(
    constants: ErrorModel, trace: BodyTrace, features: torch.Tensor, here: Sequence[Arithmetic], delta: torch.Tensor,
    labels: torch.Tensor,
) -> Answers:
    """Everything one evaluation (stages in the arithmetic ``here``, input rounding ``delta``) proves."""
    error = body_error(constants, trace, here)
    center, head_err = exact_head_logits(constants, features, trace.features)
    enclosure = enclose(center, head_err, error + constants.body_lipschitz * delta, constants)
    valid = enclosure.finite & (enclosure.low > 0)
    radius32 = network_radius(constants, trace, here, constants.plan(FLOAT32_ACC64), enclosure, delta)
    radius_any = network_radius(constants, trace, here, constants.plan(FLOAT32), enclosure, delta)
    known32, known_any = valid & (radius32 > 0), valid & (radius_any > 0)
    return Answers(
        top=enclosure.top, low=enclosure.low, high=enclosure.high, margin=enclosure.margin, finite=enclosure.finite,
        label_gap=label_gap(enclosure, labels),
        prediction32=torch.where(known32, enclosure.top, torch.full_like(enclosure.top, UNKNOWN)),
        radius32=torch.where(known32, radius32, torch.zeros_like(radius32)),
        prediction_any=torch.where(known_any, enclosure.top, torch.full_like(enclosure.top, -1)),
        radius_any=torch.where(known_any, radius_any, torch.zeros_like(radius_any)),
        float64=torch.full_like(enclosure.finite, all(a == FLOAT64 for a in here)),
    )


# --- the evaluations ----------------------------------------------------------------------------------------
def fast_pass(model: nn.Module, model64: nn.Module, constants: ErrorModel, images: torch.Tensor, labels: torch.Tensor) -> Answers:
    """The model's own float32 stages up to the dense layers (convolutions at float32 speed; those with few
    outputs summed per tap, which is faster and tighter), then the dense layers and the head in float64
    (``model64``): they sum thousands of terms per output and would hold most of a float32 pass's bound."""
    x, delta = as_points(images, torch.float32)
    here = constants.plan(FLOAT32, FLOAT64, by_taps=True)
    split = here.index(FLOAT64) if FLOAT64 in here else len(here)
    convolved, first = trace_body(model, x, 0, split, here)
    features, rest = trace_body(model64, convolved.double(), split)
    trace = BodyTrace({**first.inputs, **rest.inputs}, {**first.hidden, **rest.hidden}, rest.features)
    return assess(constants, trace, features, here, delta, labels)


def float64_pass(model64: nn.Module, constants: ErrorModel, images: torch.Tensor, labels: torch.Tensor) -> Answers:
    """Every stage in float64 (``model64``): bounds of the exact radius about a hundred million times tighter."""
    x, delta = as_points(images, torch.float64)
    features, trace = trace_body(model64, x)
    return assess(constants, trace, features, constants.plan(FLOAT64), delta, labels)


def float32_prediction(logits: torch.Tensor) -> torch.Tensor:
    """A float32 network's class: the largest logit, or -1 on a tie for the top or non-finite logits."""
    if logits.shape[1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    top2 = logits.topk(2, dim=1)
    clear = torch.isfinite(logits).all(dim=1) & (top2.values[:, 0] > top2.values[:, 1])
    return torch.where(clear, top2.indices[:, 0], torch.full_like(top2.indices[:, 0], -1))
