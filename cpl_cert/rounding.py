"""Rigorous bounds on the rounding error of a CPL network's forward pass (docs/math.md, section 6).

The network runs in floating point; its certificates are about the exact function of the stored
weights. For each stage of the body (normalisation, CPL layers, pooling) this module bounds, per
sample, how far the computed output can be from the exact stage applied to the computed input. The
bounds depend only on norms measured during the forward pass (the stage's input and a CPL layer's
hidden units) and on constants fixed once per model; errors made early are carried by the later
stages' Lipschitz constants (1 for a frozen, certified network). ``ErrorModel`` holds the constants;
``trace_body`` runs the body and measures the norms; ``body_error`` and ``ball_body_error`` turn them
into bounds at the point and anywhere in a ball around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    POTENTIAL_LAYER_TYPES,
    BlockSumPool,
    ChannelPad,
    CPLConv2d,
    CPLLinear,
    InputNormalization,
    LLNHead,
    SLLConv2d,
    SLLLinear,
    TruncationHead,
)
from .lipschitz import LayerBound, LipschitzBounds
from .numerics import FP64_SLACK, gamma, norm_upper, round_up, smallest_normal, unit_roundoff


@dataclass(frozen=True)
class StageConstants:
    """What the rounding bound of one body stage needs; ``kind`` is normalize, pad, cpl, sll, pool or flatten.

    For an SLL layer (``sll_constants``) ``step`` is unused, ``sigma``, ``abs_sigma``, ``bias_norm`` are those
    of ``B = diag(sqrt(2 t)) W`` and ``sqrt(2 t) b``, ``step_max`` is ``max 2 t_i`` and ``weight_abs`` bounds
    ``|| |W| ||`` (both for underflow only)."""

    name: str
    kind: str
    lipschitz: float
    width: int = 0  # largest number of values per sample the stage computes (for underflow terms)
    step: float = 0.0  # cpl: the step h
    sigma: float = 0.0  # cpl: certified upper bound of ||W||
    abs_sigma: float = 0.0  # cpl: upper bound of || |W| ||
    bias_norm: float = 0.0  # cpl: norm of the bias broadcast over positions; normalize: of the mean
    terms_w: int = 0  # cpl: summands per output of W x; pool: k * k
    terms_wt: int = 0  # cpl: summands per output of W^T r
    inv_std: float = 1.0  # normalize: 1 / min(std)
    step_max: float = 0.0  # sll: max_i 2 t_i
    weight_abs: float = 0.0  # sll: upper bound of || |W| ||

    @property
    def measured(self) -> bool:
        """Whether the bound needs this stage's input norm."""
        return self.kind in ("normalize", "cpl", "sll", "pool")


@dataclass(frozen=True)
class HeadConstants:
    """Rounding constants of the head: ``row_error[i]`` bounds ``||w_hat_i - w_i / ||w_i||||`` for the
    float32 head's normalised rows, ``row_norm[i]`` bounds ``||w_hat_i||``; zero for a truncation head."""

    kind: str
    features: int
    row_error: torch.Tensor
    row_norm: torch.Tensor
    bias: torch.Tensor
    exact_weight: torch.Tensor | None = field(default=None, repr=False)  # float64 normalised rows (LLN)


@dataclass(frozen=True)
class ErrorModel:
    """Per-model constants of the rounding bounds, computed once (``error_model``)."""

    stages: list[StageConstants]
    head: HeadConstants
    body_lipschitz: float
    head_pairs: torch.Tensor  # c[i, j]: Lipschitz constant of f_i - f_j with respect to the features
    pair_lipschitz: torch.Tensor  # L[i, j] >= c[i, j] * body_lipschitz: the same with respect to the input


# --- constants ---------------------------------------------------------------------------------------
def error_model(model: nn.Module, bounds: LipschitzBounds) -> ErrorModel:
    """The constants of every stage of ``model``'s body and of its head, with the layer rows of ``bounds``
    (each CPL layer's step, certified sigma and Lipschitz bound)."""
    rows = {row.name: row for row in bounds.layers}
    sizes = _stage_input_sizes(model)
    stages = [_stage_constants(name, stage, rows.get(name), size) for (name, stage), size in zip(model.body(), sizes, strict=True)]
    return ErrorModel(stages, _head_constants(model.head), bounds.body_upper, bounds.head_pairs, bounds.pair_lipschitz())


@torch.no_grad()
def _stage_input_sizes(model: nn.Module) -> list[int]:
    """Values per sample entering each body stage (one zero image through the body)."""
    reference = next(iter(model.buffers()))
    x = torch.zeros((1, *model.config.input_shape), dtype=reference.dtype, device=reference.device)
    sizes = []
    for _, stage in model.body():
        sizes.append(x[0].numel())
        x = stage(x)
    return sizes


@torch.no_grad()
def _stage_constants(name: str, stage: nn.Module, row: LayerBound | None, size: int) -> StageConstants:
    lipschitz = row.bound if row is not None else 1.0
    if isinstance(stage, InputNormalization):
        positions = size // stage.mean.numel()
        mean_norm = round_up(float(stage.mean.detach().double().norm()) * math.sqrt(positions))
        return StageConstants(name, "normalize", lipschitz, width=size, inv_std=lipschitz, bias_norm=mean_norm)
    if isinstance(stage, (CPLConv2d, CPLLinear)):
        assert row is not None and row.step is not None and row.sigma_upper is not None
        return _cpl_constants(name, stage, row.bound, row.step, row.sigma_upper)
    if isinstance(stage, (SLLConv2d, SLLLinear)):
        assert row is not None and row.sigma_upper is not None
        return sll_constants(name, stage, row.bound, row.sigma_upper)
    if isinstance(stage, BlockSumPool):
        k = int(stage.kernel_size) if isinstance(stage.kernel_size, int) else int(stage.kernel_size[0])
        return StageConstants(name, "pool", 1.0, width=size, terms_w=k * k)
    if isinstance(stage, (ChannelPad, nn.Flatten)):
        return StageConstants(name, "pad" if isinstance(stage, ChannelPad) else "flatten", 1.0)
    raise TypeError(f"no rounding model for the stage {name} ({type(stage).__name__})")


def _cpl_constants(name: str, layer: nn.Module, lipschitz: float, step: float, sigma: float) -> StageConstants:
    """Norm of ``|W|``, bias norm and summand counts of one CPL layer, beside its step and certified sigma."""
    weight = layer.weight.detach().double()
    if isinstance(layer, (CPLConv2d, SLLConv2d)):
        abs_matrix = weight.abs().sum(dim=(2, 3))  # |K| summed over taps dominates every |K_hat(w)|
        positions = layer.input_size[0] * layer.input_size[1]
        taps = weight.shape[2] * weight.shape[3]
        terms_w, terms_wt = weight.shape[1] * taps, weight.shape[0] * taps
        width = max(weight.shape[0], weight.shape[1]) * positions
    else:
        abs_matrix, positions = weight.abs(), 1
        terms_w, terms_wt, width = weight.shape[1], weight.shape[0], max(weight.shape)
    abs_sigma = _abs_norm_upper(abs_matrix)
    bias_norm = round_up(float(layer.bias.detach().double().norm()) * math.sqrt(positions))
    return StageConstants(
        name, "cpl", lipschitz, width=width, step=step, sigma=sigma, abs_sigma=abs_sigma,
        bias_norm=bias_norm, terms_w=terms_w, terms_wt=terms_wt,
    )


def _abs_norm_upper(matrix: torch.Tensor, iters: int = 30) -> float:
    """Upper bound of the spectral norm of a non-negative matrix ``M`` (float64).

    Collatz-Wielandt: for the non-negative ``A = M^T M`` and any positive ``v``,
    ``rho(A) <= max_i (A v)_i / v_i``; ``v`` from a few power iterations makes it tight. The float64
    products of non-negative numbers are off by at most ``gamma_n`` relative, covered by the factor.
    """
    v = torch.ones(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for _ in range(iters):
        v = matrix.t() @ (matrix @ v)
        v = v / v.max().clamp_min(1e-300) + 1e-12  # stays positive
    ratio = float(((matrix.t() @ (matrix @ v)) / v).max())
    relative = 2.0 * gamma(max(matrix.shape) + 1, torch.float64) + FP64_SLACK
    return round_up(math.sqrt(ratio * (1.0 + relative)))


@torch.no_grad()
def _head_constants(head: nn.Module) -> HeadConstants:
    if isinstance(head, TruncationHead):
        zeros = torch.zeros(head.num_classes, dtype=torch.float64)
        return HeadConstants("truncation", 0, zeros, zeros, zeros)
    assert isinstance(head, LLNHead)
    exact = F.normalize(head.weight.detach().double(), dim=1)
    computed = head.normalized_weight().detach().float().double()  # the rows the float32 forward uses
    own = gamma(head.features + 3, torch.float64)  # the float64 normalisation's own error
    row_error = ((computed - exact).norm(dim=1) + own) * (1.0 + FP64_SLACK * 4)
    row_norm = computed.norm(dim=1) * (1.0 + gamma(head.features + 2, torch.float64) + FP64_SLACK)
    return HeadConstants("lln", head.features, row_error, row_norm, head.bias.detach().double().clone(), exact)


# --- measuring the forward pass -----------------------------------------------------------------------
@dataclass
class BodyTrace:
    """Per-sample norms measured while running the body: ``inputs[k]`` of stage k's input (measured
    stages only), ``hidden[k]`` of a CPL layer's hidden units (of an SLL layer's scaled by ``sqrt(2 t)``),
    ``features`` of the body's output."""

    inputs: dict[int, torch.Tensor]
    hidden: dict[int, torch.Tensor]
    features: torch.Tensor


def trace_body(model: nn.Module, x: torch.Tensor, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, BodyTrace]:
    """Run body stages ``start:stop`` of ``model`` on ``x`` exactly as ``model.features`` does, measuring norms."""
    stages = model.body()
    trace = BodyTrace({}, {}, torch.empty(0))
    for index in range(start, len(stages) if stop is None else stop):
        _, stage = stages[index]
        if isinstance(stage, (InputNormalization, BlockSumPool, *POTENTIAL_LAYER_TYPES)):
            trace.inputs[index] = norm_upper(x)
        if isinstance(stage, POTENTIAL_LAYER_TYPES):
            hidden, step = stage.hidden(x), stage.current_step()
            sll = isinstance(stage, (SLLConv2d, SLLLinear))
            trace.hidden[index] = sll_hidden_norm(hidden, step) if sll else norm_upper(hidden)
            x = stage.update(x, hidden, step)
        else:
            x = stage(x)
    trace.features = norm_upper(x)
    return x, trace


# --- per-stage bounds ---------------------------------------------------------------------------------
def stage_error(c: StageConstants, a: torch.Tensor, hidden: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Bound of ``||computed stage output - exact stage(computed input)||`` for input norm ``a``.

    ``hidden`` is the measured norm of a CPL layer's computed hidden units (``None``: bounded from ``a``).
    """
    u, tiny = unit_roundoff(dtype), smallest_normal(dtype)
    underflow = (c.terms_w + c.terms_wt + 6) * tiny * math.sqrt(c.width)  # per-operation absolute errors
    if c.kind == "normalize":
        return gamma(2, dtype) * (a + c.bias_norm) * c.inv_std + underflow
    if c.kind == "pool":
        return gamma(c.terms_w + 2, dtype) * a + underflow
    if c.kind == "sll":
        return sll_error(c, a, hidden, u, dtype) + sll_underflow(c, dtype)
    if c.kind != "cpl":
        return torch.zeros_like(a)
    return _cpl_error(c, a, hidden, u, dtype) + underflow


def _cpl_error(c: StageConstants, a: torch.Tensor, hidden: torch.Tensor | None, u: float, dtype: torch.dtype) -> torch.Tensor:
    """The CPL layer's bound (docs/math.md 6.2): ``z = x - h W^T relu(W x + b)`` with every product and sum rounded."""
    h, s, sa, beta = c.step, c.sigma, c.abs_sigma, c.bias_norm
    e_p = gamma(c.terms_w, dtype) * sa * a  # W x
    e_q = e_p + u * (s * a + e_p + beta)  # + b
    r_exact = s * a + beta  # ||relu(W x + b)|| <= ||W x + b||
    r_computed = hidden if hidden is not None else r_exact + e_q
    r_exact = torch.minimum(r_exact, r_computed + e_q)
    e_s = s * e_q + gamma(c.terms_wt, dtype) * sa * r_computed  # W^T r
    sigma_norm = s * r_exact
    e_t = abs(h) * e_s + u * abs(h) * (sigma_norm + e_s)  # h * (W^T r)
    return e_t + u * (a + abs(h) * sigma_norm + e_t)  # x - t


# --- SLL layers (kept apart: one rounded product per hidden unit more than a CPL layer) -----------------
# With the per-unit step s = 2 t and B = diag(sqrt s) W, the exact layer is z = x - B^T diag(sqrt s) relu(W x + b):
# a CPL layer with step 1 and operator B, all of whose norms are measured in the scaled hidden space.
@torch.no_grad()
def sll_constants(name: str, layer: SLLConv2d | SLLLinear, lipschitz: float, a_upper: float) -> StageConstants:
    """An SLL layer's constants, for ``B = diag(sqrt s) W`` (``s = 2 t``): ``sigma >= ||B|| = sqrt(2) ||A||`` from
    the certified ``||A|| <= a_upper``, ``abs_sigma >= || |B| ||``, ``bias_norm >= ||sqrt(s) b||`` over positions.

    ``B`` is formed in float64 (a square root and a product per entry, ``gamma_2`` relative), so ``|B|`` is at
    most ``1 + 2 gamma_2`` times the computed one, entrywise; the norms are scaled by that."""
    root = layer.current_step().detach().double().clamp_min(0.0).sqrt().flatten()
    scaled = layer.weight.detach().double() * root.view(-1, *[1] * (layer.weight.dim() - 1))
    inflate = 1.0 + 2.0 * gamma(2, torch.float64) + FP64_SLACK
    conv = isinstance(layer, SLLConv2d)
    positions = layer.input_size[0] * layer.input_size[1] if conv else 1
    abs_sigma = _abs_norm_upper(scaled.abs().sum(dim=(2, 3)) if conv else scaled.abs()) * inflate
    bias_norm = round_up(float((layer.bias.detach().double() * root).norm()) * math.sqrt(positions) * inflate)
    base = _cpl_constants(name, layer, lipschitz, 0.0, 0.0)  # summand counts, width and || |W| ||
    return StageConstants(
        name, "sll", lipschitz, width=base.width, sigma=round_up(math.sqrt(2.0) * a_upper * (1.0 + 2.0 * unit_roundoff(torch.float64))),
        abs_sigma=round_up(abs_sigma), bias_norm=bias_norm, terms_w=base.terms_w, terms_wt=base.terms_wt,
        step_max=round_up(float(root.max()) ** 2) if root.numel() else 0.0, weight_abs=base.abs_sigma,
    )


def sll_underflow(c: StageConstants, dtype: torch.dtype) -> float:
    """Absolute errors near underflow (at most ``eta`` per operation, per value): ``W x`` (``n1`` per unit) and
    ``+ b`` scaled by ``sqrt(s)`` and carried by ``B^T``, the product ``s * r`` carried by ``W^T``, ``W^T``'s own
    ``n2`` per output and the subtraction; each vector has at most ``width`` values."""
    carried = (c.terms_w + 1) * math.sqrt(c.step_max) * c.sigma + c.weight_abs + c.terms_wt + 1
    return round_up(carried * smallest_normal(dtype) * math.sqrt(c.width))


def sll_hidden_norm(hidden: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Per-sample upper bound of ``||sqrt(s) * r~||`` for the computed hidden units ``r~`` and per-unit step ``s``,
    computed in ``hidden``'s precision: the square root and the product round twice per unit (at most ``2.0001 u``
    relative, each way), underflow adds ``eta`` per unit."""
    u, tiny = unit_roundoff(hidden.dtype), smallest_normal(hidden.dtype)
    units = hidden[0].numel() if hidden.shape[0] else 0
    measured = norm_upper(hidden * step.to(hidden.dtype).sqrt())
    return (measured + tiny * math.sqrt(units)) / (1.0 - 3.0 * u)


def sll_product_error(c: StageConstants, scaled_hidden: torch.Tensor, u: float) -> torch.Tensor:
    """The SLL layer's own term: ``||W^T (fl(s * r~) - s * r~)|| <= u ||B|| ||sqrt(s) r~||``.

    Each product ``s_i r~_i`` is one correctly rounded multiplication, ``s_i r~_i (1 + d_i)`` with ``|d_i| <= u``,
    so the error vector is ``diag(s) diag(d) r~`` and its image ``W^T diag(s) diag(d) r~ = B^T diag(d) diag(sqrt s) r~``
    (diagonal matrices commute) has norm at most ``||B|| u ||sqrt(s) r~||``. docs/math.md section 6.2.
    """
    return c.sigma * u * scaled_hidden


def sll_error(c: StageConstants, a: torch.Tensor, scaled_hidden: torch.Tensor | None, u: float, dtype: torch.dtype) -> torch.Tensor:
    """The SLL layer's bound (docs/math.md 6.2): ``z = x - W^T (s * relu(W x + b))`` with every product, sum and the
    product ``s * r`` rounded. Errors of the hidden units are measured after scaling by ``sqrt(s)``, where
    ``W^T diag(s) = B^T diag(sqrt s)`` carries them with ``||B||``. ``scaled_hidden`` bounds ``||sqrt(s) r~||``
    (``None``: bounded from ``a``)."""
    b, b_abs, beta = c.sigma, c.abs_sigma, c.bias_norm
    e_p = gamma(c.terms_w, dtype) * b_abs * a  # sqrt(s) (fl(W x) - W x)
    e_q = e_p + u * (b * a + e_p + beta)  # + b (relu is 1-Lipschitz per unit: adds nothing)
    r_exact = b * a + beta  # ||sqrt(s) relu(W x + b)|| <= ||B x + sqrt(s) b||
    r_computed = scaled_hidden if scaled_hidden is not None else r_exact + e_q
    r_exact = torch.minimum(r_exact, r_computed + e_q)
    e_m = sll_product_error(c, r_computed, u)  # s * r
    e_s = b * e_q + e_m + gamma(c.terms_wt, dtype) * (1.0 + u) * b_abs * r_computed  # W^T (s * r)
    return e_s + u * (a + b * r_exact + e_s)  # x - v


# --- whole body -----------------------------------------------------------------------------------------
def body_error(model_err: ErrorModel, trace: BodyTrace, dtypes: list[torch.dtype]) -> torch.Tensor:
    """Per-sample bound of ``||computed features - exact features(computed input)||``; ``dtypes[k]`` is the
    dtype stage k ran in."""
    total = torch.zeros_like(trace.features)
    for index, c in enumerate(model_err.stages):
        total = total * c.lipschitz
        if c.measured:
            total = total + stage_error(c, trace.inputs[index], trace.hidden.get(index), dtypes[index])
    return total * (1.0 + FP64_SLACK)


def ball_body_error(model_err: ErrorModel, trace: BodyTrace, dtype: torch.dtype, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, Phi)``: bounds of the features' rounding error and of the computed features' norm at any
    input within ``distance`` (per sample) of the traced one, when the whole body runs in ``dtype``.

    Stage k's computed input there has norm at most its measured norm here, plus the exact map's
    Lipschitz constant times ``distance``, plus the rounding errors at both points.
    """
    here = torch.zeros_like(trace.features)
    there = torch.zeros_like(trace.features)
    lipschitz = 1.0
    for index, c in enumerate(model_err.stages):
        here, there = here * c.lipschitz, there * c.lipschitz
        if c.measured:
            a = trace.inputs[index]
            a_there = a + lipschitz * distance + here + there
            here = here + stage_error(c, a, trace.hidden.get(index), dtype)
            there = there + stage_error(c, a_there, None, dtype)
        lipschitz *= c.lipschitz
    features = trace.features + lipschitz * distance + here + there
    return there * (1.0 + FP64_SLACK), features * (1.0 + FP64_SLACK)


# --- head --------------------------------------------------------------------------------------------
def exact_head_logits(model_err: ErrorModel, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, error)``: the head applied in float64 to ``features``, and a per-logit bound of its
    distance to the exact head applied to the same features."""
    head = model_err.head
    feats = features.double()
    if head.kind == "truncation":
        logits = feats[:, : head.row_error.shape[0]]
        return logits, torch.zeros_like(logits)
    assert head.exact_weight is not None
    logits = F.linear(feats, head.exact_weight.to(feats.device), head.bias.to(feats.device))
    phi = norm_upper(feats)[:, None]
    own = gamma(head.features + 3, torch.float64)
    error = own * phi + gamma(head.features + 1, torch.float64) * ((1.0 + own) * phi + head.bias.abs().to(feats.device))
    return logits, error * (1.0 + FP64_SLACK)


def float32_head_error(model_err: ErrorModel, features_norm: torch.Tensor) -> torch.Tensor:
    """Per-logit bound (B, K) of the float32 head's own rounding on features of norm ``features_norm``."""
    head = model_err.head
    if head.kind == "truncation":
        return torch.zeros(features_norm.shape[0], head.row_error.shape[0], dtype=torch.float64, device=features_norm.device)
    phi = features_norm[:, None]
    row_error, row_norm, bias = (t.to(features_norm.device) for t in (head.row_error, head.row_norm, head.bias))
    g = gamma(head.features + 1, torch.float32)
    return (row_error * phi + g * (row_norm * phi + bias.abs())) * (1.0 + FP64_SLACK)
