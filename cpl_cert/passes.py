"""The forward passes certification runs: the body stage by stage with the norms its rounding bound needs,
and cpl-cert's float32 network (float32 activations, float64 accumulation; docs/math.md section 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import conv64
from .layers import POTENTIAL_LAYER_TYPES, SLL_LAYER_TYPES, LLNHead
from .lipschitz import stage_kind
from .numerics import Arithmetic, norm_upper
from .rounding import MEASURED_KINDS, BodyTrace, sll_hidden_norm


def trace_body(
    model: nn.Module, x: torch.Tensor, start: int = 0, stop: int | None = None, plan: Sequence[Arithmetic] | None = None
) -> tuple[torch.Tensor, BodyTrace]:
    """Run body stages ``start:stop`` of ``model`` on ``x`` as ``model.features`` does, measuring the norm of
    every measured stage's input and of every CPL layer's hidden units (an SLL layer's scaled by ``sqrt(2 t)``;
    upper bounds, float64). A stage whose arithmetic in ``plan`` is by taps computes ``W x + b`` with
    ``conv64.conv2d_by_taps`` instead of its own convolution."""
    stages = model.body()
    trace = BodyTrace({}, {}, torch.empty(0))
    for index in range(start, len(stages) if stop is None else stop):
        name, stage = stages[index]
        if stage_kind(name, stage) in MEASURED_KINDS:
            trace.inputs[index] = norm_upper(x)
        if isinstance(stage, POTENTIAL_LAYER_TYPES):
            by_taps = plan is not None and plan[index].by_taps
            hidden, step = _hidden_by_taps(stage, x) if by_taps else stage.hidden(x), stage.current_step()
            trace.hidden[index] = sll_hidden_norm(hidden, step) if isinstance(stage, SLL_LAYER_TYPES) else norm_upper(hidden)
            x = stage.update(x, hidden, step)
        else:
            x = stage(x)
    trace.features = norm_upper(x)
    return x, trace


def _hidden_by_taps(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``relu(W x + b)`` of a convolutional layer, with ``W x + b`` summed per tap and rounded once to float32."""
    return F.relu(conv64.conv2d_by_taps(x, layer.weight, layer.bias, layer.padding).float())


@torch.no_grad()
def accumulated_logits(model: nn.Module, model64: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """cpl-cert's float32 network: the logits of ``model`` at the float32 images ``x`` with every dot product
    (convolutions, matrix products, their biases) computed in float64 from the float32 operands and rounded
    once to float32; every other operation is the float32 model's own. ``model64`` is ``float64_copy(model)``."""
    x = accumulated_features(model, model64, x)
    if isinstance(model.head, LLNHead):
        weight = model.head.normalized_weight().double()
        return F.linear(x.double(), weight, model.head.bias.double()).float()
    return model.head(x)


@torch.no_grad()
def accumulated_features(model: nn.Module, model64: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The body of cpl-cert's float32 network (``accumulated_logits`` without the head)."""
    x = x.float()
    for (_, stage), (_, stage64) in zip(model.body(), model64.body(), strict=True):
        x = _accumulated_layer(stage64, x) if isinstance(stage, POTENTIAL_LAYER_TYPES) else stage(x)
    return x


def _accumulated_layer(layer64: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One CPL or SLL layer of cpl-cert's float32 network: ``r = fl32(relu(W x + b))`` (rounding commutes with
    the ReLU) and ``z = fl32(x - h W^T r)`` (SLL: ``fl32(x - W^T (2t * r))``), both right-hand sides in float64
    (``layer64`` holds the float32 weights, bias and step as float64, exactly)."""
    wide = x.double()
    hidden = layer64.hidden(wide).float()
    return layer64.update(wide, hidden.double(), layer64.current_step()).float()
