"""Spectral norms of CPL weights: power iteration, rigorous upper bounds, and ``freeze``.

Power iteration converges from below, so its estimate can make a layer slightly more than
1-Lipschitz. The upper bounds here are certified (up to float64 rounding, covered by a tiny
safety factor): dense layers use the exact largest singular value, convolutions the FFT bound of
the circular convolution on the zero-padded grid (see docs/math.md).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers import STEP_EPSILON, CPLConv2d, CPLLinear

Operator = Callable[[torch.Tensor], torch.Tensor]

ROUNDING_SAFETY = 1.0 + 1e-10
"""Upper bounds are multiplied by this to cover float64 rounding (actual errors are ~1e-13)."""


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
    """Exact ``||W||_2`` in float64 (largest eigenvalue of the smaller Gram matrix), times a rounding margin."""
    w = weight.detach().double()
    gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
    top = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0))
    return top**0.5 * ROUNDING_SAFETY


@torch.no_grad()
def conv_sigma_upper(weight: torch.Tensor, input_size: tuple[int, int]) -> float:
    """Upper bound of the norm of a zero-padded 'same' convolution on an ``input_size`` image.

    The zero-padded operator is a restriction of the circular convolution on the grid enlarged by
    the kernel's padding, whose norm is exactly ``max_w ||K_hat(w)||_2`` (one small matrix per frequency).
    """
    inner, channels, kh, kw = weight.shape
    grid = (input_size[0] + kh - 1, input_size[1] + kw - 1)
    spectrum = torch.fft.fft2(weight.detach().double(), s=grid)  # (inner, channels, H', W')
    per_frequency = spectrum.permute(2, 3, 0, 1).reshape(-1, inner, channels)
    return float(torch.linalg.svdvals(per_frequency).max()) * ROUNDING_SAFETY


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
    """``||W u||`` for the layer's stored unit vector: the converged power-iteration value after ``freeze``."""
    return _sigma_float64(layer_operators(layer)[0], layer.u)


def step_for_sigma(sigma: float) -> float:
    """The paper's step ``2 / (sigma^2 + 1e-4)``, rounded *down* to float32 so it never exceeds the float64 value."""
    exact = 2.0 / (sigma * sigma + STEP_EPSILON)
    step32 = torch.tensor(exact, dtype=torch.float32)
    if float(step32) > exact:
        step32 = torch.nextafter(step32, torch.tensor(0.0))
    return float(step32)


@torch.no_grad()
def freeze_layer(layer: CPLLinear | CPLConv2d, max_iters: int = 2000, tol: float = 1e-7) -> float:
    """Converge the layer's power iteration, then fix its step; returns the step.

    The step uses ``max(sigma_power, sigma_upper)``: the certified bound guarantees the frozen layer is
    1-Lipschitz even where power iteration has not fully converged (it converges from below).
    """
    apply_w, apply_wt = layer_operators(layer, torch.float32)  # fast iterations
    apply_w64, _ = layer_operators(layer, torch.float64)  # precise measurement
    measure = functools.partial(_sigma_float64, apply_w64)
    sigma_p, u = power_iteration(apply_w, apply_wt, layer.u.float(), max_iters, tol, check_every=10, measure=measure)
    layer.u.copy_(u.to(layer.u.dtype))
    step = step_for_sigma(max(sigma_p, sigma_upper(layer)))
    layer.set_frozen_step(step)
    return step


def freeze(model: nn.Module, max_iters: int = 2000, tol: float = 1e-7) -> nn.Module:
    """Freeze every CPL layer of ``model`` (power iteration to convergence, step fixed) and set eval mode.

    A frozen model is a fixed function: inference never re-estimates a spectral norm.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, (CPLLinear, CPLConv2d)):
            freeze_layer(module, max_iters=max_iters, tol=tol)
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when every CPL layer of ``model`` has a fixed step."""
    return all(m.frozen for m in model.modules() if isinstance(m, (CPLLinear, CPLConv2d)))
