"""Spectral norms of CPL weights: power iteration, rigorous upper bounds, and ``freeze``.

Power iteration converges from below, so its estimate can make a layer slightly more than
1-Lipschitz. The upper bounds here are certified, their own float64 rounding included: dense layers
use the exact largest singular value, convolutions the FFT bound of the circular convolution on the
zero-padded grid (see docs/math.md). ``freeze`` takes the step from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CplCertError
from .layers import STEP_EPSILON, CPLConv2d, CPLLinear
from .numerics import gamma, round_up, strict_math, unit_roundoff

Operator = Callable[[torch.Tensor], torch.Tensor]

def layer_operators(layer: CPLLinear | CPLConv2d, dtype: torch.dtype = torch.float64) -> tuple[Operator, Operator]:
    """``(W, W^T)`` of a CPL layer as functions, computed in ``dtype`` (bias excluded)."""
    weight = layer.weight.detach().to(dtype)
    if isinstance(layer, CPLConv2d):
        pad = layer.padding
        return (lambda x: F.conv2d(x, weight, padding=pad)), (lambda y: F.conv_transpose2d(y, weight, padding=pad))
    return (lambda x: F.linear(x, weight)), (lambda y: F.linear(y, weight.t()))


@torch.no_grad()
def power_iteration(
    apply_w: Operator,
    apply_wt: Operator,
    u: torch.Tensor,
    max_iters: int = 2000,
    tol: float = 1e-7,
    check_every: int = 1,
    measure: Callable[[torch.Tensor], float] | None = None,
) -> tuple[float, torch.Tensor]:
    """Estimate ``||W||_2`` from the start vector ``u``; stop when sigma's relative change < ``tol``.

    ``measure(u)`` computes sigma for a unit vector (default ``||W u||`` with the same operator); pass
    a float64 one to iterate cheaply in float32 yet measure precisely (sigma's error is quadratic in
    the vector's). Returns ``(sigma, unit vector)``. The estimate is a lower bound of the true norm.
    """
    measure = measure or (lambda vec: float(apply_w(vec).flatten().norm()))
    u = u / u.flatten().norm()
    sigma = measure(u)
    for i in range(1, max_iters + 1):
        v = apply_wt(apply_w(u))
        norm = v.flatten().norm()
        if float(norm) == 0.0:
            return 0.0, u
        u = v / norm
        if i % check_every == 0 or i == max_iters:
            new_sigma = measure(u)
            converged = abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-30)
            sigma = new_sigma
            if converged:
                break
    return sigma, u


@torch.no_grad()
def dense_sigma_upper(weight: torch.Tensor) -> float:
    """Certified ``||W||_2``: the top eigenvalue of the smaller float64 Gram matrix, plus its rounding.

    Added before the square root: the Gram product's rounding (``gamma_k |W||W|^T``, whose norm is at
    most ``||W||_1 ||W||_inf``) and the eigensolver's backward error, taken as ``m u ||G||`` for an
    ``m x m`` matrix (LAPACK's symmetric solvers are backward stable with a modest multiple of ``u``).
    """
    w = weight.detach().double()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    inner, size = max(w.shape), min(w.shape)
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))
    absolute = w.abs()
    gram_error = gamma(inner, torch.float64) * float(absolute.sum(0).max()) * float(absolute.sum(1).max())
    eig_error = size * unit_roundoff(torch.float64) * top
    return _finite_sigma(round_up((top + gram_error + eig_error) ** 0.5))


@torch.no_grad()
def conv_sigma_upper(weight: torch.Tensor, input_size: tuple[int, int]) -> float:
    """Upper bound of the norm of a zero-padded 'same' convolution on an ``input_size`` image.

    The zero-padded operator is a restriction of the circular convolution on the grid enlarged by
    the kernel's padding, whose norm is exactly ``max_w ||K_hat(w)||_2`` (one small matrix per frequency).
    Added: the FFT's rounding (at most ``5 log2(N) u sqrt(N) ||K||_F`` per frequency matrix) and the
    SVD's backward error (``m u ||K_hat||`` for the larger side ``m``).
    """
    inner, channels, kh, kw = weight.shape
    grid = (input_size[0] + kh - 1, input_size[1] + kw - 1)
    kernel = weight.detach().double()
    spectrum = torch.fft.fft2(kernel, s=grid)  # (inner, channels, H', W')
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, inner, channels)
    top = float(torch.linalg.svdvals(per_frequency).max())
    points = grid[0] * grid[1]
    u = unit_roundoff(torch.float64)
    fft_error = 5.0 * math.log2(max(points, 2)) * u * math.sqrt(points) * float(kernel.norm())
    svd_error = max(inner, channels) * u * top
    return _finite_sigma(round_up(top + fft_error + svd_error))


def _finite_sigma(value: float) -> float:
    if not math.isfinite(value):
        raise CplCertError("a CPL layer's weights are too large for a finite spectral-norm bound")
    return value


def sigma_upper(layer: CPLLinear | CPLConv2d) -> float:
    """Certified upper bound of ``||W||_2`` for a CPL layer (see module docstring)."""
    if isinstance(layer, CPLConv2d):
        return conv_sigma_upper(layer.weight, layer.input_size)
    return dense_sigma_upper(layer.weight)


def _sigma_float64(apply_w64: Operator, vec: torch.Tensor) -> float:
    """``||W v|| / ||v||`` in float64: the power-iteration value of ``v``."""
    vec = vec.detach().double()
    return float(apply_w64(vec / vec.flatten().norm()).flatten().norm())


def sigma_power(layer: CPLLinear | CPLConv2d) -> float:
    """``||W u||`` for the layer's stored unit vector: the power-iteration estimate (a lower bound)."""
    return _sigma_float64(layer_operators(layer)[0], layer.u)


def step_for_sigma(sigma: float) -> float:
    """The paper's step ``2 / (sigma^2 + 1e-4)``, rounded *down* to float32 so it never exceeds the exact value."""
    if not (math.isfinite(sigma) and sigma >= 0):
        raise CplCertError(f"cannot choose a step for a spectral norm of {sigma}")
    exact = Fraction(2) / (Fraction(sigma) ** 2 + Fraction(STEP_EPSILON))  # rational: no rounding to undo
    step32 = torch.tensor(float(exact), dtype=torch.float32)
    while Fraction(float(step32)) > exact:
        step32 = torch.nextafter(step32, torch.tensor(0.0))
    step = float(step32)
    if not step > 0:
        raise CplCertError(f"a CPL layer's spectral norm ({sigma:.3g}) is too large for a positive float32 step")
    return step


REPORT_ITERS = 100
"""Power iterations ``freeze`` runs, warm from the stored vector, for the report's ``sigma_power`` only."""


@torch.no_grad()
def freeze_layer(layer: CPLLinear | CPLConv2d, max_iters: int = REPORT_ITERS, tol: float = 1e-7) -> float:
    """Fix the layer's step at ``2 / (sigma_upper^2 + 1e-4)`` (rounded down); returns the step.

    The step comes from the certified upper bound alone, so the frozen layer is 1-Lipschitz whatever
    power iteration did. ``max_iters`` warm-started power iterations refresh the stored vector, whose
    ``||W u||`` the bounds table reports beside the certified bound (it converges from below).
    """
    step = step_for_sigma(sigma_upper(layer))
    if max_iters > 0:
        apply_w, apply_wt = layer_operators(layer, torch.float32)
        _, u = power_iteration(apply_w, apply_wt, layer.u.float(), max_iters, tol, check_every=10)
        if bool(torch.isfinite(u).all()):
            layer.u.copy_(u.to(layer.u.dtype))
    layer.set_frozen_step(step)
    return step


def freeze(model: nn.Module, max_iters: int = REPORT_ITERS, tol: float = 1e-7) -> nn.Module:
    """Freeze every CPL layer of ``model`` (step fixed from its certified bound) and set eval mode.

    A frozen model is a fixed function: inference never re-estimates a spectral norm. Runs with
    full-precision math (no TF32) so that the bounds it relies on are computed as docs/math.md says.
    """
    model.eval()
    with strict_math():
        for module in model.modules():
            if isinstance(module, (CPLLinear, CPLConv2d)):
                freeze_layer(module, max_iters=max_iters, tol=tol)
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when every CPL layer of ``model`` has a fixed step."""
    return all(m.frozen for m in model.modules() if isinstance(m, (CPLLinear, CPLConv2d)))
