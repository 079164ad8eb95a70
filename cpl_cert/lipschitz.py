"""Per-layer and network Lipschitz bounds (certified upper, empirical lower).

For a CPL layer with step ``h`` and ``s = ||W||_2`` the Jacobian ``I - h W^T D W`` (``0 <= D <= I``) is
symmetric with eigenvalues in ``[1 - h s^2, 1]``, so ``Lip = max(1, h s^2 - 1)``, evaluated here with the
certified upper bound of ``s``. An SLL layer is the same with ``h = 2`` and ``s = ||diag(sqrt t) W||``
(``cpl_cert.sll``). The network bound is the product over all layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .data import to_float_images
from .errors import CplCertError
from .layers import BlockSumPool, ChannelPad, CPLConv2d, CPLLinear, InputNormalization, LLNHead, SLLConv2d, SLLLinear, TruncationHead
from .models import CPLNet, float64_copy
from .numerics import FP64_SLACK, round_up
from .progress import OnProgress
from .sll import scaled_norm_upper, scaled_sigma_power
from .spectral import sigma_power, sigma_upper


@dataclass
class LayerBound:
    """One row of the bounds table. ``step`` and the sigmas are ``None`` for layers other than CPL and SLL ones;
    an SLL row has no single step (``None``: it applies ``2 t`` per unit) and its sigmas are those of
    ``diag(sqrt t) W``."""

    name: str
    kind: str
    bound: float
    step: float | None = None
    sigma_power: float | None = None
    sigma_upper: float | None = None


@dataclass
class LipschitzBounds:
    """Certified bounds of a network: ``upper`` for the whole map, ``body_upper`` without the head,
    ``head_pairs[i, j]`` the Lipschitz constant of ``f_i - f_j`` with respect to the head's input."""

    layers: list[LayerBound]
    upper: float
    body_upper: float
    head_pairs: torch.Tensor = field(repr=False)
    lower: float | None = None

    def pair_lipschitz(self) -> torch.Tensor:
        """``L[i, j]``: certified Lipschitz constant of the logit difference ``f_i - f_j`` (float64, rounded up)."""
        return self.head_pairs * self.body_upper * (1.0 + FP64_SLACK)

    def to_dict(self) -> dict[str, Any]:
        return {
            "upper": self.upper,
            "lower": self.lower,
            "body_upper": self.body_upper,
            "layers": [asdict(layer) for layer in self.layers],
        }


def check_assumed_bound(value: float | None) -> None:
    """Refuse an assumed body bound that is not a positive finite number (``None``: none assumed)."""
    if value is not None and not (0 < value < float("inf")):
        raise CplCertError(f"--assume-lipschitz must be a positive number, got {value}")


def assume_body_bound(bounds: LipschitzBounds, value: float) -> LipschitzBounds:
    """``bounds`` with the body's Lipschitz bound replaced by an assumed ``value``: certificates computed with it
    are audited (``cpl-cert attack --assume-lipschitz``), never guaranteed."""
    check_assumed_bound(value)
    head = bounds.layers[-1].bound
    return replace(bounds, body_upper=value, upper=value * head)


def cpl_layer_bound(step: float, sigma_up: float) -> float:
    """``max(1, |1 - h s^2|)``: the exact worst-case Lipschitz constant of a CPL layer, for any real step.

    The Jacobian ``I - h W^T D W`` has eigenvalues in ``[1 - h s^2, 1]`` for ``h >= 0`` and in
    ``[1, 1 + |h| s^2]`` for ``h < 0``. A non-finite step or sigma has no bound: ``CplCertError``.
    """
    if not (math.isfinite(step) and math.isfinite(sigma_up) and sigma_up >= 0):
        raise CplCertError(f"a CPL layer has no valid Lipschitz bound (step {step}, sigma bound {sigma_up})")
    h_s2 = round_up(abs(step) * sigma_up * sigma_up)  # three float64 roundings, covered by the slack
    if step >= 0:
        bound = 1.0 if h_s2 <= 2.0 else round_up(h_s2 - 1.0)
    else:
        bound = round_up(1.0 + h_s2)
    if not math.isfinite(bound):
        raise CplCertError(f"a CPL layer's Lipschitz bound overflows (step {step}, sigma bound {sigma_up})")
    return bound


STAGE_KINDS = ("normalize", "channel-pad", "cpl-conv", "cpl-dense", "sll-conv", "sll-dense", "block-sum-pool", "flatten")
"""The kinds of body stage, one vocabulary for the bounds table, the rounding model and the reports."""
POTENTIAL_KINDS = ("cpl-conv", "cpl-dense", "sll-conv", "sll-dense")
"""The kinds of layer of the form ``x - W^T diag(step) relu(W x + b)``."""


def stage_kind(name: str, stage: nn.Module) -> str:
    """The kind of one body stage of ``CPLNet.body()``; a stage cpl-cert has no bound for is an error."""
    for types, kind in (
        (InputNormalization, "normalize"), (ChannelPad, "channel-pad"), (CPLConv2d, "cpl-conv"), (CPLLinear, "cpl-dense"),
        (SLLConv2d, "sll-conv"), (SLLLinear, "sll-dense"), (BlockSumPool, "block-sum-pool"), (nn.Flatten, "flatten"),
    ):
        if isinstance(stage, types):
            return kind
    raise CplCertError(f"cpl-cert has no Lipschitz bound for the stage {name} ({type(stage).__name__})")


def stage_bound(name: str, stage: nn.Module) -> LayerBound:
    """The bounds-table row of one body stage: its certified Lipschitz constant, and for a CPL layer its step
    and ``||W||``, for an SLL layer (step 2) ``||diag(sqrt t) W||``."""
    kind = stage_kind(name, stage)
    if kind == "normalize":
        assert isinstance(stage, InputNormalization)
        return LayerBound(name, kind, stage.lipschitz())
    if kind in ("sll-conv", "sll-dense"):
        a_up = scaled_norm_upper(stage)[0]
        return LayerBound(name, kind, cpl_layer_bound(2.0, a_up), None, scaled_sigma_power(stage), a_up)
    if kind in ("cpl-conv", "cpl-dense"):
        assert isinstance(stage, (CPLConv2d, CPLLinear))
        step, s_up = float(stage.current_step()), sigma_upper(stage)
        return LayerBound(name, kind, cpl_layer_bound(step, s_up), step=step, sigma_power=sigma_power(stage), sigma_upper=s_up)
    return LayerBound(name, kind, 1.0)  # channel padding (an isometry), block-sum pool, flatten


@torch.no_grad()
def lipschitz_bounds(model: CPLNet) -> LipschitzBounds:
    """Certified per-stage bounds and their product for a CPL or SLL network (frozen or not).

    One row per stage of ``model.body()``, in order (the rounding model reads them by position), then the
    head. Uses the step or rescaling inference actually applies (``layer.current_step()``), so the result is a
    bound on the function the model computes in eval mode.
    """
    rows = [stage_bound(name, stage) for name, stage in model.body()]
    body_upper = product_upper(row.bound for row in rows)
    head = model.head
    assert isinstance(head, (TruncationHead, LLNHead))
    rows.append(LayerBound("head", "lln-head" if isinstance(head, LLNHead) else "truncation-head", head.lipschitz()))
    head_pairs = head.pair_lipschitz()
    off_diagonal = ~torch.eye(head_pairs.shape[0], dtype=torch.bool)
    if not bool(torch.isfinite(head_pairs).all() and (head_pairs[off_diagonal] > 0).all()):
        raise CplCertError("the head's class-pair Lipschitz constants are not all positive and finite")
    return LipschitzBounds(
        layers=rows,
        upper=product_upper([body_upper, rows[-1].bound]),
        body_upper=body_upper,
        head_pairs=head_pairs,
    )


def product_upper(factors: Iterable[float]) -> float:
    """Product of non-negative bounds, rounded up; a non-finite product is an error, never a bound."""
    values = list(factors)
    product = 1.0 if all(v == 1.0 for v in values) else round_up(math.prod(values))
    if not (math.isfinite(product) and product > 0):
        raise CplCertError(f"the network's Lipschitz bound is not a positive finite number ({product})")
    return product


class _Linearised:
    """The Jacobian ``J`` of ``model`` at ``x`` as two products from one retained graph, so each costs one
    backward pass and no forward (``J v`` is the derivative of ``J^T w`` in ``w``: the double-backward trick,
    which also avoids ``torch.func``'s seconds of first-call set-up)."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            self.y = model(self.x)
            self.w = torch.zeros_like(self.y, requires_grad=True)
            (self.jt_w,) = torch.autograd.grad(self.y, self.x, self.w, create_graph=True)

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self.jt_w, self.w, v, retain_graph=True)[0]

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(self.y, self.x, u, retain_graph=True)[0]


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Each sample's vector scaled to norm 1."""
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (v.dim() - 1))


def lipschitz_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    iters: int = 30,
    generator: torch.Generator | None = None,
    on_progress: OnProgress | None = None,
) -> float:
    """Largest ``||J(x)||_2`` found by power iteration on ``J^T J`` at each input; a lower bound.

    The iterations only look for a direction, so they run in float32 (three times cheaper than float64
    on a CPU); the value reported is ``||J v||`` of the final unit direction measured on a float64 copy,
    so rounding cannot push it above the true norm. Every sample runs in the same batched products.
    ``on_progress("lower_bound", done, iters)`` after each iteration.
    """
    exact = float64_copy(model)
    x = inputs.detach().double()
    linear = _Linearised(copy.deepcopy(exact).float(), x.float())
    if not bool(torch.isfinite(linear.y).all()):  # float32 overflows at this scale: search in float64
        linear = _Linearised(exact, x)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device).to(linear.x.dtype)
    for done in range(1, iters + 1):
        v = linear.jtu(linear.jv(_unit(v))).detach()
        if on_progress is not None:
            on_progress("lower_bound", done, iters)
    v = _unit(v.double())
    jv = _Linearised(exact, x).jv(v)
    return float(jv.detach().flatten(1).norm(dim=1).max())


LOWER_SAMPLES = 8
"""Test images ``certify`` reports the empirical lower bound at (``cpl-cert certify --lower-bound-samples``)."""
LOWER_ITERS = 20
"""Power iterations of that lower bound per image (float32 search, float64 value: docs/certify.md)."""


def data_lower_bound(
    model: nn.Module, images: torch.Tensor, samples: int = LOWER_SAMPLES, iters: int = LOWER_ITERS, on_progress: OnProgress | None = None
) -> float:
    """The empirical lower bound ``cpl-cert certify`` reports: ``lipschitz_lower_bound`` at the first ``samples`` of
    ``images`` (uint8 pixels or floats in [0, 1]) with ``iters`` iterations from a seed-0 start."""
    probe = to_float_images(images[:samples].to(next(model.buffers()).device))
    return lipschitz_lower_bound(model, probe, iters=iters, generator=torch.Generator().manual_seed(0), on_progress=on_progress)
