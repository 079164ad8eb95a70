"""Independent references for the soundness tests: exact operator norms and closed-form boundaries.

Nothing here calls cpl_cert's bound code: norms come from explicit matrices and SVDs, boundaries from
the closed forms of networks without CPL layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpl_cert.layers import CPLConv2d, CPLLinear


def conv_matrix(layer: CPLConv2d) -> torch.Tensor:
    """The zero-padded convolution as an explicit float64 matrix (small inputs only)."""
    c, (h, w) = layer.channels, layer.input_size
    basis = torch.eye(c * h * w, dtype=torch.float64).view(-1, c, h, w)
    return F.conv2d(basis, layer.weight.detach().double(), padding=layer.padding).flatten(1).t()


def exact_norm(layer: CPLConv2d | CPLLinear) -> float:
    """``||W||_2`` of the layer's operator, from an SVD of its explicit float64 matrix."""
    matrix = conv_matrix(layer) if isinstance(layer, CPLConv2d) else layer.weight.detach().double()
    return float(torch.linalg.svdvals(matrix)[0])


def all_active_jacobian_norm(layer: CPLConv2d | CPLLinear) -> float:
    """``||I - h W^T W||_2``: the layer's Jacobian where every hidden unit is active, the worst case."""
    matrix = conv_matrix(layer) if isinstance(layer, CPLConv2d) else layer.weight.detach().double()
    step = float(layer.step)
    jac = torch.eye(matrix.shape[1], dtype=torch.float64) - step * matrix.t() @ matrix
    return float(torch.linalg.matrix_norm(jac, 2))


def pixel_batch(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random uint8 images."""
    return torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
