"""Freezing: fix every potential layer's step (CPL) or rescaling (SLL) for good, from certified bounds.

A frozen model is a fixed function: inference never re-estimates a spectral norm. The step of a CPL layer is
``2 / (sigma_upper^2 + 1e-4)`` rounded down to float32, where ``sigma_upper`` is the certified upper bound of
``cpl_cert.spectral``, so the frozen layer is 1-Lipschitz whatever the stored power-iteration vector is; that
vector is refreshed (Lanczos) only for the report's ``sigma_power``. SLL layers: ``cpl_cert.sll``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from .dense_norm import dense_norm_bound
from .errors import CplCertError
from .layers import POTENTIAL_LAYER_TYPES, STEP_EPSILON, CPLConv2d, CPLLinear, SLLConv2d, SLLLinear
from .numerics import strict_math
from .sll import freeze_sll_layer
from .spectral import REPORT_ITERS, conv_sigma_upper, refresh_vector, store_vector


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


@torch.no_grad()
def freeze_layer(layer: CPLLinear | CPLConv2d, max_iters: int = REPORT_ITERS, tol: float = 1e-7) -> float:
    """Fix the layer's step at ``2 / (sigma_upper^2 + 1e-4)`` (rounded down); returns the step.

    The step comes from the certified upper bound alone, so the frozen layer is 1-Lipschitz whatever the
    stored vector is. With ``max_iters > 0`` the vector is refreshed for the bounds table's ``sigma_power``
    (``||W u||``, a lower bound beside the certified one): a large dense layer takes the top singular vector
    its bound computed anyway, any other layer runs ``refresh_vector``.
    """
    vector = None
    if isinstance(layer, CPLConv2d):
        sigma = conv_sigma_upper(layer.weight, layer.input_size)
    else:
        sigma, vector = dense_norm_bound(layer.weight)
    step = step_for_sigma(sigma)
    if max_iters > 0:
        if vector is None:
            refresh_vector(layer, max_iters, tol)
        else:
            store_vector(layer, vector)
    layer.set_frozen_step(step)
    return step


def freeze(model: nn.Module, max_iters: int = REPORT_ITERS, tol: float = 1e-7) -> nn.Module:
    """Freeze every CPL layer of ``model`` (step fixed from its certified bound) and every SLL layer (float32
    rescaling whose certified ``||diag(sqrt t) W||`` proves bound 1, ``cpl_cert.sll``) and set eval mode.

    A frozen model is a fixed function: inference never re-estimates a spectral norm. Runs with
    full-precision math (no TF32) so that the bounds it relies on are computed as docs/math.md says.
    """
    model.eval()
    with strict_math():
        for module in model.modules():
            if isinstance(module, (CPLLinear, CPLConv2d)):
                freeze_layer(module, max_iters=max_iters, tol=tol)
            elif isinstance(module, (SLLLinear, SLLConv2d)):
                freeze_sll_layer(module, max_iters=max_iters, tol=tol)
    return model


def is_frozen(model: nn.Module) -> bool:
    """True when every CPL layer of ``model`` has a fixed step and every SLL layer a fixed rescaling."""
    return all(m.frozen for m in model.modules() if isinstance(m, POTENTIAL_LAYER_TYPES))
