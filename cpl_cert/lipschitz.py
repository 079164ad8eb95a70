"""Per-layer and network Lipschitz bounds (certified upper, empirical lower).

For a CPL layer with step ``h`` and ``s = ||W||_2`` the Jacobian ``I - h W^T D W`` (``0 <= D <= I``) is
symmetric with eigenvalues in ``[1 - h s^2, 1]``, so ``Lip = max(1, h s^2 - 1)``, evaluated here with the
certified upper bound of ``s``. An SLL layer is the same with ``h = 2`` and ``s = ||diag(sqrt t) W||``
(``cpl_cert.sll``). The network bound is the product over all layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CplCertError
from .layers import CPLConv2d, CPLLinear, LLNHead, SLLConv2d, SLLLinear, TruncationHead
from .models import CPLNet, float64_copy
from .numerics import FP64_SLACK, round_up
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


def layer_row(name: str, layer: nn.Module) -> LayerBound:
    """The bounds-table row of one CPL layer (its step, ``||W||``) or SLL layer (step 2, ``||diag(sqrt t) W||``)."""
    conv = isinstance(layer, (CPLConv2d, SLLConv2d))
    if isinstance(layer, (SLLConv2d, SLLLinear)):
        a_up = scaled_norm_upper(layer)[0]
        kind = "sll-conv" if conv else "sll-dense"
        return LayerBound(name, kind, cpl_layer_bound(2.0, a_up), None, scaled_sigma_power(layer), a_up)
    assert isinstance(layer, (CPLConv2d, CPLLinear))
    step = float(layer.current_step())
    s_up = sigma_upper(layer)
    kind = "cpl-conv" if conv else "cpl-dense"
    return LayerBound(name, kind, cpl_layer_bound(step, s_up), step, sigma_power(layer), s_up)


@torch.no_grad()
def lipschitz_bounds(model: CPLNet) -> LipschitzBounds:
    """Certified per-layer bounds and their product for a CPL or SLL network (frozen or not).

    Uses the step or rescaling inference actually applies (``layer.current_scale()``), so the result is a
    bound on the function the model computes in eval mode.
    """
    rows: list[LayerBound] = [
        LayerBound("normalize", "normalize", model.normalize.lipschitz()),
        LayerBound("pad", "channel-pad", 1.0),
    ]
    for prefix, container in (("convs", model.convs), ("dense", model.dense)):
        for index, layer in enumerate(container):
            rows.append(layer_row(f"{prefix}.{index}", layer))
        if prefix == "convs":
            rows.append(LayerBound("pool", "block-sum-pool", 1.0))
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


def lipschitz_lower_bound(
    model: nn.Module,
    inputs: torch.Tensor,
    iters: int = 30,
    generator: torch.Generator | None = None,
) -> float:
    """Largest ``||J(x)||_2`` found by autograd power iteration (``J^T J``) at each input; a lower bound.

    Runs on a float64 copy of the model so that rounding cannot push it above the true norm. The
    network acts on each sample independently, so one batched jvp/vjp gives every sample's product.
    """
    model = float64_copy(model)
    x = inputs.detach().double()
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    best = 0.0
    with warnings.catch_warnings():  # torch.func warns about torch.jit.script from inside torch: not the caller's concern
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        for _ in range(iters):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-300).view(-1, *[1] * (x.dim() - 1))
            jv = torch.func.jvp(model, (x,), (v,))[1]
            best = max(best, float(jv.detach().flatten(1).norm(dim=1).max()))
            _, vjp_fn = torch.func.vjp(model, x)
            v = vjp_fn(jv)[0].detach()
    return best
