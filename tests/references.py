"""Independent references for the soundness tests: exact operator norms and closed-form boundaries.

Nothing here calls cpl_cert's bound code: norms come from explicit matrices and SVDs, boundaries from
the closed forms of networks without CPL layers.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import torch
import torch.nn.functional as F

from cpl_cert.layers import CPLConv2d, CPLLinear


def conv_matrix(layer: CPLConv2d) -> torch.Tensor:
    """The zero-padded convolution as an explicit float64 matrix (small inputs only).

    Built in float32 (fast): each entry is one kernel weight times 1 plus zeros, so it is exact.
    """
    c, (h, w) = layer.channels, layer.input_size
    basis = torch.eye(c * h * w, dtype=torch.float32).view(-1, c, h, w)
    return F.conv2d(basis, layer.weight.detach().float(), padding=layer.padding).flatten(1).t().double()


def exact_norm(layer: CPLConv2d | CPLLinear) -> float:
    """``||W||_2`` of the layer's operator, from an SVD of its explicit float64 matrix."""
    matrix = conv_matrix(layer) if isinstance(layer, CPLConv2d) else layer.weight.detach().double()
    return float(torch.linalg.svdvals(matrix)[0])


def all_active_jacobian_norm(layer: CPLConv2d | CPLLinear) -> float:
    """``||I - h W^T W||_2``: the layer's Jacobian where every hidden unit is active, the worst case.

    Its eigenvalues are ``1 - h sigma_i^2`` for the singular values of ``W``, and 1 on the kernel of ``W``.
    """
    matrix = conv_matrix(layer) if isinstance(layer, CPLConv2d) else layer.weight.detach().double()
    sigmas = torch.linalg.svdvals(matrix)
    values = (1.0 - float(layer.step) * sigmas**2).abs()
    has_kernel = sigmas.numel() < matrix.shape[1] or bool((sigmas == 0).any())
    return max(float(values.max()), 1.0 if has_kernel else 0.0)


def pixel_batch(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random uint8 images."""
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalized_row_distances(weight: torch.Tensor, digits: int = 60) -> list[list[Decimal]]:
    """``||w_i / ||w_i|| - w_j / ||w_j||||`` for the stored rows, to ``digits`` significant digits (Decimal
    arithmetic on the exact values of the floats): the true pair constants of an LLN head."""
    with localcontext() as context:
        context.prec = digits
        rows = [[Decimal(float(v)) for v in row] for row in weight.detach().double().tolist()]
        unit = [[v / sum(x * x for x in row).sqrt() for v in row] for row in rows]
        return [[sum((a - b) ** 2 for a, b in zip(u, v, strict=True)).sqrt() for v in unit] for u in unit]
