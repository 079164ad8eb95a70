"""Spectral norms of CPL weights: the layers' operators, power iteration, rigorous upper bounds, Lanczos refreshes.

Power iteration converges from below, so its estimate can make a layer slightly more than
1-Lipschitz. The upper bounds here are certified, their own float64 rounding included: dense layers
the top eigenvalue of the Gram matrix, proved by a Cholesky factorisation (small ones: an eigensolver and its
backward error; ``cpl_cert.dense_norm``),
convolutions the FFT bound of the circular convolution on the zero-padded grid (see docs/math.md).
``cpl_cert.freezing`` takes the steps from them; Lanczos (``refresh_vector``) refreshes the stored vector
that the report's ``sigma_power`` measures.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .dense_norm import dense_norm_bound
from .errors import CplCertError
from .lanczos import lanczos_top
from .layers import CPLConv2d, CPLLinear, SLLConv2d, SLLLinear
from .numerics import round_up, unit_roundoff

Operator = Callable[[torch.Tensor], torch.Tensor]


def layer_operators(layer: CPLLinear | CPLConv2d, dtype: torch.dtype = torch.float64) -> tuple[Operator, Operator]:
    """``(W, W^T)`` of a CPL layer as functions, computed in ``dtype`` (bias excluded).

    A convolution's transpose is the convolution with the kernel's channels swapped and taps flipped
    (padding ``k - 1 - p`` = ``p`` for a 'same' kernel): the same sums as ``conv_transpose2d``, several
    times faster on one vector.
    """
    weight = layer.weight.detach().to(dtype)
    if isinstance(layer, CPLConv2d):
        pad = layer.padding
        flipped = weight.transpose(0, 1).flip(2, 3).contiguous()
        return (lambda x: F.conv2d(x, weight, padding=pad)), (lambda y: F.conv2d(y, flipped, padding=pad))
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
    """Certified ``||W||_2``: the smaller float64 Gram matrix's top eigenvalue, bounded above with its rounding.

    Large matrices: a Lanczos estimate, then a Cholesky factorisation of a slightly shifted ``tau I - G``
    proves ``lambda_max <= tau`` plus rounding terms; small ones: ``eigvalsh`` plus its backward error.
    Both include the Gram product's rounding (``cpl_cert.dense_norm``, docs/math.md section 3).
    """
    return dense_norm_bound(weight)[0]


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
    # A real kernel's exact spectrum at -w is the conjugate of that at w, with the same singular values:
    # columns 0 .. W'/2 hold a frequency of every conjugate pair, so the others need no SVD.
    half = spectrum[..., : grid[1] // 2 + 1]
    per_frequency = half.permute(2, 3, 0, 1).reshape(-1, inner, channels)
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


REPORT_ITERS = 30
"""Lanczos steps (at most) ``freeze`` spends per layer, warm from the stored vector, on the report's ``sigma_power``."""

RESTART_STEPS = 30
"""Lanczos steps between restarts (the basis is kept in memory, one vector per step)."""


@torch.no_grad()
def refresh_vector(
    layer: CPLLinear | CPLConv2d | SLLLinear | SLLConv2d, max_iters: int, tol: float = 1e-7, operators: tuple[Operator, Operator] | None = None
) -> None:
    """Replace the stored vector by the top Ritz vector of ``W^T W`` after at most ``max_iters`` Lanczos steps
    (float32, restarted every ``RESTART_STEPS``, warm from the stored vector, so never worse than it).

    Stops once the Ritz residual is below ``sqrt(tol)`` times the eigenvalue, i.e. once sigma has converged to
    about ``tol`` (relative). Feeds the report only: no step depends on it. ``operators`` replaces ``(W, W^T)``
    (float32; an SLL layer passes ``diag(sqrt t) W`` and its transpose).
    """
    apply_w, apply_wt = operators or layer_operators(layer, torch.float32)
    shape = layer.u.shape
    vector, left = layer.u.float().flatten(), max_iters
    while left > 0:
        theta, vector, residual = lanczos_top(
            lambda v: apply_wt(apply_w(v.view(shape))).flatten(), vector, min(left, RESTART_STEPS), rtol=tol**0.5
        )
        left -= RESTART_STEPS
        if residual <= tol**0.5 * theta:
            break
    store_vector(layer, vector)


def store_vector(layer: CPLLinear | CPLConv2d | SLLLinear | SLLConv2d, vector: torch.Tensor | None) -> None:
    """Store a unit vector (a zero, infinite or missing one leaves the stored vector as it is)."""
    if vector is None:
        return
    vector = vector.detach().to(layer.u.dtype).reshape(layer.u.shape)
    norm = float(vector.norm())
    if math.isfinite(norm) and norm > 0:
        layer.u.copy_(vector / norm)
