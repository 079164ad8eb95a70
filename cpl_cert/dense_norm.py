"""Certified upper bound of ``||W||_2`` for a dense matrix, proved with one Cholesky factorisation.

``||W||_2^2`` is the top eigenvalue of the smaller Gram matrix ``G``. Instead of computing every
eigenvalue, a Lanczos estimate ``theta`` picks a shift ``tau`` a hair above it, and a float64 Cholesky
factorisation of ``tau I - G`` that runs to completion proves ``tau I - G`` positive semi-definite up to
its rounding (Demmel's and Rump's bound), so ``lambda_max(G) <= tau + (rounding terms)``. That costs a
third of a symmetric eigensolver and keeps the bound within about 1e-9 of the exact norm. Should every
shift fail (never seen), the eigenvalue route of docs/math.md takes over. Small matrices take that route
directly: it is cheap there and exact. docs/math.md section 3 derives every term.
"""

from __future__ import annotations

import math

import torch

from .errors import CplCertError
from .lanczos import lanczos_top
from .numerics import gamma, round_up, smallest_normal, unit_roundoff

CHOLESKY_MIN_SIZE = 256
"""Gram matrices at least this large are certified by a Cholesky factorisation; smaller ones by ``eigvalsh``."""

GRAM_BLOCK = 256
"""Rows per block of the Gram product (only the lower-triangle blocks are multiplied)."""

SHIFT_MARGINS = (1e-9, 1e-7, 1e-5, 1e-3)
"""Relative margins above the Lanczos estimate tried in turn as the certified shift."""

LANCZOS_STEPS, LANCZOS_RTOL = 150, 3e-6
"""Most Lanczos steps for the estimate, and the residual (relative) at which it stops."""

_F64 = torch.float64
_LARGEST = 1e300


def gram(side: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``side @ side.T`` in float64 from its lower-triangle blocks (about half a full product), exactly symmetric."""
    side = side.to(_F64)
    n = side.shape[0]
    out = torch.empty(n, n, dtype=_F64, device=side.device)
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            part = side[i : i + block] @ side[j : j + block].t()
            if j == i:  # keep the lower triangle (what the factorisations read) and mirror it exactly
                part = part.tril() + part.tril(-1).t()
            out[i : i + block, j : j + block] = part
            out[j : j + block, i : i + block] = part.t()
    return out


def gram_error(weight: torch.Tensor) -> float:
    """Bound on ``||fl(G) - G||_2`` for a float64 Gram product: ``gamma_k || |W| |W|^T || <= gamma_k ||W||_1 ||W||_inf``,
    plus ``k`` underflows per entry (which float32 weights, whose products are exact in float64, never cause).

    The column and row sums of ``|W|`` are taken in ``W``'s own precision and inflated by their rounding.
    """
    absolute = weight.detach().abs()
    if absolute.dtype not in (torch.float32, _F64):
        absolute = absolute.to(_F64)
    inner, size = max(weight.shape), min(weight.shape)
    sums = (1.0 + 2.0 * gamma(inner, absolute.dtype)) ** 2
    norms = float(absolute.sum(0).max()) * float(absolute.sum(1).max()) * sums
    underflow = size * inner * smallest_normal(_F64)
    return round_up(gamma(inner, _F64) * norms + underflow)


def estimate_top(matrix: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Lanczos estimate (in float32, from a fixed start) of the top eigenpair of a symmetric PSD float64 matrix,
    its eigenvalue re-measured in float64 as the vector's Rayleigh quotient. Deterministic for given weights."""
    scale = float(matrix.diagonal().abs().max())
    if not (math.isfinite(scale) and scale > 0):
        return scale if math.isfinite(scale) else math.nan, torch.zeros(matrix.shape[0], dtype=_F64, device=matrix.device)
    scaled = torch.div(matrix, scale, out=torch.empty(matrix.shape, dtype=torch.float32, device=matrix.device))
    start = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(0)).to(matrix.device)
    _, vector, _ = lanczos_top(lambda v: scaled @ v, start, min(LANCZOS_STEPS, matrix.shape[0]), LANCZOS_RTOL)
    vector = vector.to(_F64)
    vector = vector / vector.norm()
    return float(vector @ (matrix @ vector)) / float(vector @ vector), vector


def cholesky_certificate(negated: torch.Tensor, diagonal: torch.Tensor, tau: float, error: float) -> float | None:
    """Upper bound of ``lambda_max`` of the exact Gram matrix if float64 Cholesky of ``tau I - G`` succeeds.

    ``negated`` is ``-G`` for the computed Gram matrix ``G`` (its diagonal is overwritten with ``tau - g_ii``),
    ``diagonal`` holds ``g_ii``, and ``G`` is within ``error`` (spectral norm) of the exact Gram matrix. The
    factorisation of ``A = fl(tau I - G)`` gives ``R^T R = A + E`` with ``||E|| <= c (tr A + n e) + n e``,
    ``c = gamma_{n+1} / (1 - gamma_{n+1})`` and ``e`` the underflow allowance; forming ``A`` rounds its diagonal
    by at most ``2 u max a_ii``. Returns ``None`` when the factorisation breaks down (``tau`` too small).
    """
    n = negated.shape[0]
    shifted = negated.diagonal()
    shifted.copy_(tau - diagonal)  # one rounding per entry; off-diagonal entries are exact
    if not bool((shifted > 0).all()):
        return None
    factor, info = torch.linalg.cholesky_ex(negated)
    if int(info) != 0 or not bool(torch.isfinite(factor.diagonal()).all()):
        return None
    max_diag = float(shifted.max())
    trace = float(shifted.sum()) * (1.0 + 2.0 * gamma(n, _F64))  # a sum of n non-negative terms
    c = gamma(n + 1, _F64) / (1.0 - gamma(n + 1, _F64))
    underflow = (4 * n + 2 + 2 * max_diag) * smallest_normal(_F64)
    factorisation = c * (trace + n * underflow) + n * underflow
    return round_up(tau + factorisation + 2 * unit_roundoff(_F64) * max_diag + error)


def shifted_bound(matrix: torch.Tensor, theta: float, error: float) -> float | None:
    """The first certificate that succeeds for the shifts ``theta (1 + margin)``, or ``None``.

    Uses ``matrix`` as scratch space (negated, diagonal rewritten) and restores it exactly before returning.
    """
    diagonal = matrix.diagonal().clone()
    matrix.neg_()
    try:
        for margin in SHIFT_MARGINS:
            bound = cholesky_certificate(matrix, diagonal, max(theta, 0.0) * (1.0 + margin) + smallest_normal(_F64), error)
            if bound is not None:
                return bound
        return None
    finally:
        matrix.neg_()
        matrix.diagonal().copy_(diagonal)


def eigenvalue_bound(matrix: torch.Tensor, error: float) -> float:
    """Upper bound of ``lambda_max`` of the exact Gram matrix from ``eigvalsh``: the computed top eigenvalue plus
    the eigensolver's backward error (taken as ``n u ||G||``) and the Gram product's ``error``."""
    top = float(torch.linalg.eigvalsh(matrix)[-1].clamp_min(0.0))
    return round_up(top + matrix.shape[0] * unit_roundoff(_F64) * top + error)


def top_eigenvalue_bound(matrix: torch.Tensor, error: float, min_size: int = CHOLESKY_MIN_SIZE) -> tuple[float, torch.Tensor | None]:
    """Certified ``lambda_max`` bound of the exact Gram matrix (computed as ``matrix``, within ``error``) and,
    on the Cholesky route, the estimate's unit vector (``None`` on the eigenvalue route)."""
    if not float(matrix.diagonal().max()) <= _LARGEST:  # NaN fails too; |g_ij| <= sqrt(g_ii g_jj) (rounded)
        raise CplCertError("a CPL layer's weights are not finite, or too large for a spectral-norm bound")
    if matrix.shape[0] < min_size:
        return eigenvalue_bound(matrix, error), None
    theta, vector = estimate_top(matrix)
    bound = shifted_bound(matrix, theta, error) if math.isfinite(theta) else None
    return (bound if bound is not None else eigenvalue_bound(matrix, error)), vector


def dense_norm_bound(weight: torch.Tensor, cholesky_min_size: int = CHOLESKY_MIN_SIZE) -> tuple[float, torch.Tensor | None]:
    """Certified upper bound of ``||W||_2`` and, on the Cholesky route (a Gram matrix of at least
    ``cholesky_min_size`` rows), an estimate of the top right singular vector."""
    w = weight.detach()
    wide = w.shape[0] <= w.shape[1]
    lam, vector = top_eigenvalue_bound(gram(w if wide else w.t()), gram_error(w), cholesky_min_size)
    sigma = round_up(lam**0.5)
    if not math.isfinite(sigma):
        raise CplCertError("a CPL layer's weights are too large for a finite spectral-norm bound")
    if vector is not None and wide:
        vector = vector.to(w.dtype) @ w  # W^T y: the right singular vector (a report vector: w's precision will do)
    return sigma, vector
