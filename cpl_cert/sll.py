"""SLL layers' certified bound and freezing: ``||A||`` for ``A = diag(sqrt t) W``, and a float32 ``t`` that proves it.

An SLL layer ``z = x - 2 W^T (t * relu(W x + b))`` has the Jacobian ``I - 2 A^T D A`` (``D`` the ReLU
pattern), so its Lipschitz constant is ``max(1, 2 ||A||^2 - 1)``, exactly as a CPL layer with step 2 and
spectral norm ``||A||``. The SLL rescaling gives ``||A|| <= 1`` in exact arithmetic; cpl-cert never assumes
it: ``scaled_norm_upper`` bounds ``||A||`` from above, rounding included (the dense certificate of
``cpl_cert.dense_norm`` or the FFT bound of ``cpl_cert.spectral`` applied to the rows of ``W`` scaled by
``sqrt t``), and ``freeze_sll_layer`` stores a float32 ``t``, rounded down and shrunk where the certified
bound needs it, for which that bound gives a layer bound of exactly 1 (docs/math.md section 2.1).
"""

from __future__ import annotations

import math

import torch

from .dense_norm import dense_norm_bound
from .errors import CplCertError
from .layers import SLLConv2d, SLLLinear
from .numerics import FP64_SLACK, gamma, round_up
from .spectral import REPORT_ITERS, Operator, conv_sigma_upper, refresh_vector, store_vector

SLLLayer = SLLLinear | SLLConv2d

SHRINK_MARGINS = (2.0**-30, 2.0**-24, 2.0**-20, 2.0**-16, 2.0**-12, 2.0**-8)
"""Relative margins below ``1 / ||A||_up^2`` tried in turn when ``freeze`` must shrink ``t`` (rarely more than the first)."""


def scaled_weight(weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(M, e)``: ``M = diag(sqrt t) W`` in float64 (rows of a matrix, output channels of a kernel) and a bound
    ``e >= ||M - A||_2`` of its rounding for the operator of either kind.

    Each entry is ``sqrt`` then one product, two correctly rounded float64 operations: ``|M - A| <= gamma_2 |A|``
    entrywise, hence ``|M - A| <= gamma_2 / (1 - gamma_2) |M|``. For a matrix ``||M - A||_2 <= || |M - A| ||_F``;
    for a convolution the perturbation kernel's operator norm is at most ``|| sum_p |dK_p| ||_2``, itself at most
    the Frobenius norm of that sum, which is at most ``sqrt(taps)`` times the kernel's Frobenius norm.
    """
    t64 = t.detach().double().clamp_min(0.0)
    w64 = weight.detach().double()
    m = w64 * t64.sqrt().view(-1, *[1] * (w64.dim() - 1))
    taps = m[0, 0].numel() if m.dim() == 4 else 1
    relative = gamma(2, torch.float64) / (1.0 - gamma(2, torch.float64))
    frobenius = float(m.norm()) * (1.0 + gamma(m.numel() + 2, torch.float64))
    return m, round_up(relative * math.sqrt(taps) * frobenius)


def scaled_norm_upper(layer: SLLLayer, t: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
    """Certified upper bound of ``||diag(sqrt t) W||_2`` for the layer's operator (``t``: the one inference
    uses, by default) and, for a large dense layer, an estimate of the top right singular vector."""
    t = layer.current_t() if t is None else t
    if not bool(torch.isfinite(t).all() and (t >= 0).all()):
        raise CplCertError("an SLL layer's rescaling t is negative or not finite: it has no valid Lipschitz bound")
    m, error = scaled_weight(layer.weight, t)
    if isinstance(layer, SLLConv2d):
        bound, vector = conv_sigma_upper(m, layer.input_size), None
    else:
        bound, vector = dense_norm_bound(m)
    value = round_up(bound + error)
    if not math.isfinite(value):
        raise CplCertError("an SLL layer's weights are too large for a finite bound of ||diag(sqrt t) W||")
    return value, vector


def proves_one(a_upper: float) -> bool:
    """Whether ``max(1, 2 a^2 - 1)`` evaluated as ``cpl_cert.lipschitz.cpl_layer_bound(2, a)`` does is exactly 1."""
    return round_up(2.0 * a_upper * a_upper) <= 2.0


def scaled_operators(layer: SLLLayer, dtype: torch.dtype = torch.float64) -> tuple[Operator, Operator]:
    """``(A, A^T)`` of the layer as functions in ``dtype``, ``A = diag(sqrt t) W`` with the ``t`` inference uses."""
    weight = layer.weight.detach().to(dtype)
    root = layer._unit_view(layer.current_t().detach().to(dtype).clamp_min(0.0).sqrt())
    return (lambda x: layer._apply_w(x, weight) * root), (lambda y: layer._apply_wt(y * root, weight))


def scaled_sigma_power(layer: SLLLayer) -> float:
    """``||A u||`` for the layer's stored unit vector (float64): the power-iteration estimate of ``||A||``, a lower bound."""
    apply_a = scaled_operators(layer)[0]
    vec = layer.u.detach().double()
    return float(apply_a(vec / vec.flatten().norm()).flatten().norm())


def round_down_float32(values: torch.Tensor) -> torch.Tensor:
    """The largest float32 values not above the given float64 ones (non-negative input)."""
    down = values.float()
    above = down.double() > values
    return torch.where(above, torch.nextafter(down, torch.zeros_like(down)), down)


@torch.no_grad()
def certified_t(layer: SLLLayer, t: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(t', a, vector)``: ``t`` as float32 rounded down, shrunk uniformly where needed so that the certified
    ``a >= ||diag(sqrt t') W||`` proves a layer bound of exactly 1; ``vector`` as in ``scaled_norm_upper``."""
    t32 = round_down_float32(t.double().clamp_min(0.0))
    bound, vector = scaled_norm_upper(layer, t32)
    for margin in SHRINK_MARGINS:
        if proves_one(bound):
            return t32, bound, vector
        t32 = round_down_float32(t32.double() * ((1.0 - margin) / (bound * bound * (1.0 + FP64_SLACK))))
        bound, vector = scaled_norm_upper(layer, t32)
    if not proves_one(bound):
        raise CplCertError(f"could not find an SLL rescaling with a certified bound of 1 (||A|| <= {bound:.9g})")
    return t32, bound, vector


@torch.no_grad()
def freeze_sll_layer(layer: SLLLayer, max_iters: int = REPORT_ITERS, tol: float = 1e-7) -> torch.Tensor:
    """Fix the layer's rescaling at the SLL formula's ``t`` (float64, then ``certified_t``); returns it.

    Where a row of ``W`` is zero the formula gives 0 and any value computes the same function: 1 is stored
    there, so a frozen layer always holds a positive ``t`` somewhere (what marks it frozen). With
    ``max_iters > 0`` the stored vector is refreshed for the bounds table's ``||A u||``.
    """
    t64 = layer.rescaling(layer.weight.detach().double(), layer.q.detach().double())
    zero_rows = layer.weight.detach().flatten(1).abs().amax(dim=1) == 0
    t64 = torch.where(zero_rows.to(t64.device), torch.ones_like(t64), t64)
    t32, _, vector = certified_t(layer, t64)
    layer.set_frozen_t(t32)
    if max_iters > 0:
        if vector is None:
            refresh_vector(layer, max_iters, tol, operators=scaled_operators(layer, torch.float32))
        else:
            store_vector(layer, vector)
    return layer.t
