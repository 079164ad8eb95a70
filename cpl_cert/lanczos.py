"""Lanczos estimate of the top eigenpair of a symmetric positive semi-definite operator.

An *estimate* only (a Ritz value is a lower bound of the top eigenvalue, and nothing here is certified):
it picks the shift that ``dense_norm`` then certifies, and the vector that the bounds table's
``sigma_power`` reports. Full reorthogonalisation keeps it reliable in float32; it converges far faster
than power iteration when the top of the spectrum is crowded, as it is for random and trained weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]


def _tridiagonal(alphas: list[float], betas: list[float]) -> torch.Tensor:
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)


def _top_ritz(alphas: list[float], betas: list[float]) -> tuple[float, torch.Tensor, float]:
    """Top eigenpair of the Lanczos tridiagonal matrix and the Ritz pair's residual norm."""
    values, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas[: len(alphas) - 1]))
    top = vectors[:, -1]
    return float(values[-1]), top, betas[len(alphas) - 1] * float(top[-1].abs())


@torch.no_grad()
def lanczos_top(
    apply: Operator, start: torch.Tensor, max_steps: int, rtol: float = 0.0, check_every: int = 5
) -> tuple[float, torch.Tensor, float]:
    """``(theta, unit vector, residual)``: the top Ritz pair of ``apply`` and its residual ``||A y - theta y||``
    after at most ``max_steps`` (at least 1) steps from ``start``.

    Stops early once the Ritz pair's residual ``||A y - theta y||`` is below ``rtol * theta`` (checked every
    ``check_every`` steps); the eigenvalue's error is then of the order of the residual squared over the gap.
    ``apply`` maps a flat vector to a flat vector in ``start``'s dtype.
    """
    max_steps = max(1, max_steps)
    basis = torch.zeros(max_steps + 1, start.numel(), dtype=start.dtype, device=start.device)
    basis[0] = start.flatten() / start.flatten().norm()
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(max_steps):
        w = apply(basis[step])
        alphas.append(float(w @ basis[step]))
        done = basis[: step + 1]
        for _ in range(2):  # twice is enough (Kahan's rule), even in float32
            w = w - done.t() @ (done @ w)
        betas.append(float(w.norm()))
        if not betas[-1] > 0.0:
            break
        basis[step + 1] = w / betas[-1]
        if rtol > 0 and (step + 1) % check_every == 0:
            theta, _, residual = _top_ritz(alphas, betas)
            if residual <= rtol * theta:
                break
    theta, top, residual = _top_ritz(alphas, betas)
    vector = basis[: len(alphas)].t() @ top.to(device=start.device, dtype=start.dtype)
    return theta, (vector / vector.norm()).view_as(start), residual
