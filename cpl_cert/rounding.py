"""Rigorous bounds on the rounding error of a CPL network's forward pass (docs/math.md, section 6).

The network runs in floating point; its certificates are about the exact function of the stored
weights. For each stage of the body (normalisation, CPL layers, pooling) this module bounds, per
sample, how far the computed output can be from the exact stage applied to the computed input, for a
given ``Arithmetic`` (plain float32 in any summation order, float32 with float64 accumulation, or
float64). The bounds depend only on norms measured during the forward pass (a stage's input and a CPL
layer's hidden units) and on constants fixed once per model; errors made early are carried by the later
stages' Lipschitz constants (1 for a frozen, certified network). ``ErrorModel`` holds the constants (one
entry per row of ``lipschitz_bounds``, matched by position); ``body_error`` and ``ball_body_error`` turn
the measured norms into bounds at the point and anywhere in a ball around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CplCertError
from .layers import BlockSumPool, CPLConv2d, CPLLinear, InputNormalization, LLNHead, SLLConv2d, SLLLinear, TruncationHead
from .lipschitz import POTENTIAL_KINDS, LayerBound, LipschitzBounds
from .numerics import FLOAT32, FLOAT32_BY_TAPS, FLOAT64, FP64_SLACK, Arithmetic, gamma, norm_upper, round_up, smallest_normal, unit_roundoff

MEASURED_KINDS = ("normalize", *POTENTIAL_KINDS, "block-sum-pool")
"""Stages whose rounding bound needs the norm of their input (the others are exact)."""


@dataclass(frozen=True)
class StageConstants:
    """What the rounding bound of one body stage needs; ``kind`` is the stage's row kind in ``lipschitz_bounds``.

    An SLL layer ``z = x - W^T (s * relu(W x + b))`` (per-unit step ``s = 2 t``) is a CPL layer with step 1 and
    operator ``B = diag(sqrt s) W`` whose hidden units are measured scaled by ``sqrt(s)`` (``sll_constants``):
    ``sigma``, ``abs_sigma`` and ``bias_norm`` are then those of ``B`` and ``sqrt(s) b``; ``step_max`` (``max s``),
    ``weight_abs`` (``|| |W| ||``) and ``bias_abs`` (``||b||``) bound the unscaled values for underflow and overflow.
    """

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
    taps: int = 1  # cpl: kernel taps (k * k for a convolution): W x sums terms_w / taps terms per tap
    inv_std: float = 1.0  # normalize: 1 / min(std)
    step_max: float = 0.0  # sll: max_i 2 t_i
    weight_abs: float = 0.0  # sll: upper bound of || |W| ||
    bias_abs: float = 0.0  # sll: norm of the unscaled bias over positions

    @property
    def measured(self) -> bool:
        """Whether the bound needs this stage's input norm."""
        return self.kind in MEASURED_KINDS

    @property
    def is_cpl(self) -> bool:
        """A layer ``x - W^T diag(step) relu(W x + b)``: CPL, or SLL in its scaled form."""
        return self.kind in POTENTIAL_KINDS

    @property
    def is_sll(self) -> bool:
        return self.kind in ("sll-conv", "sll-dense")

    @property
    def taps_pay(self) -> bool:
        """A convolution with at most half as many outputs as inputs: summing per tap is faster there than
        oneDNN's float32 convolution, and its bound is ``k * k`` times smaller (``conv64.conv2d_by_taps``)."""
        return self.kind in ("cpl-conv", "sll-conv") and 2 * self.terms_wt <= self.terms_w


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

    def plan(self, conv: Arithmetic, dense: Arithmetic | None = None, by_taps: bool = False) -> list[Arithmetic]:
        """One arithmetic per stage: ``dense`` from the flatten stage on (default ``conv``), ``conv`` before it;
        with ``by_taps``, ``FLOAT32_BY_TAPS`` for the convolutions it pays on (``StageConstants.taps_pay``)."""
        split = next((i for i, c in enumerate(self.stages) if c.kind == "flatten"), len(self.stages))
        plan = [conv] * split + [dense or conv] * (len(self.stages) - split)
        return [FLOAT32_BY_TAPS if by_taps and c.taps_pay else a for a, c in zip(plan, self.stages, strict=True)]


# --- constants ---------------------------------------------------------------------------------------
def error_model(model: nn.Module, bounds: LipschitzBounds) -> ErrorModel:
    """The constants of every stage of ``model``'s body and of its head. ``bounds.layers`` holds one row per
    stage of ``model.body()`` in the same order, then the head's; a mismatch is an error, never a default."""
    body = model.body()
    rows = bounds.layers[: len(body)]
    names = [name for name, _ in body]
    if len(bounds.layers) != len(body) + 1 or [row.name for row in rows] != names:
        raise CplCertError(
            f"the Lipschitz bounds describe the stages {[row.name for row in bounds.layers]}, not this model's {names} and its head"
        )
    sizes = _stage_input_sizes(model)
    stages = [_stage_constants(stage, row, size) for (_, stage), row, size in zip(body, rows, sizes, strict=True)]
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
def _stage_constants(stage: nn.Module, row: LayerBound, size: int) -> StageConstants:
    """The constants of one stage, from its row of the bounds table (kind, Lipschitz bound, step, sigma)."""
    if row.kind == "normalize":
        assert isinstance(stage, InputNormalization)
        positions = size // stage.mean.numel()
        mean_norm = round_up(float(stage.mean.detach().double().norm()) * math.sqrt(positions))
        return StageConstants(row.name, row.kind, row.bound, width=size, inv_std=row.bound, bias_norm=mean_norm)
    if row.kind in ("cpl-conv", "cpl-dense"):
        assert isinstance(stage, (CPLConv2d, CPLLinear)) and row.step is not None and row.sigma_upper is not None
        return _cpl_constants(row, stage)
    if row.kind in ("sll-conv", "sll-dense"):
        assert isinstance(stage, (SLLConv2d, SLLLinear)) and row.sigma_upper is not None
        return sll_constants(row, stage)
    if row.kind == "block-sum-pool":
        assert isinstance(stage, BlockSumPool)
        k = int(stage.kernel_size) if isinstance(stage.kernel_size, int) else int(stage.kernel_size[0])
        return StageConstants(row.name, row.kind, row.bound, width=size, terms_w=k * k)
    if row.kind in ("channel-pad", "flatten"):
        return StageConstants(row.name, row.kind, row.bound)
    raise CplCertError(f"cpl-cert has no rounding model for the stage {row.name} ({row.kind})")


def _cpl_constants(row: LayerBound, layer: nn.Module) -> StageConstants:
    """Norm of ``|W|``, bias norm and summand counts of one CPL layer, beside its step and certified sigma."""
    weight = layer.weight.detach().double()
    if isinstance(layer, (CPLConv2d, SLLConv2d)):
        abs_matrix = weight.abs().sum(dim=(2, 3))  # |K| summed over taps dominates every |K_hat(w)|
        positions = layer.input_size[0] * layer.input_size[1]
        taps = weight.shape[2] * weight.shape[3]
        terms_w, terms_wt = weight.shape[1] * taps, weight.shape[0] * taps
        width = max(weight.shape[0], weight.shape[1]) * positions
    else:
        abs_matrix, positions, taps = weight.abs(), 1, 1
        terms_w, terms_wt, width = weight.shape[1], weight.shape[0], max(weight.shape)
    abs_sigma = _abs_norm_upper(abs_matrix)
    bias_norm = round_up(float(layer.bias.detach().double().norm()) * math.sqrt(positions))
    return StageConstants(
        row.name, row.kind, row.bound, width=width, step=row.step or 0.0, sigma=row.sigma_upper or 0.0, abs_sigma=abs_sigma,
        bias_norm=bias_norm, terms_w=terms_w, terms_wt=terms_wt, taps=taps,
    )


@torch.no_grad()
def sll_constants(row: LayerBound, layer: SLLConv2d | SLLLinear) -> StageConstants:
    """An SLL layer's constants in its scaled form (step 1, ``B = diag(sqrt s) W``, ``s = 2 t``): ``sigma >= ||B||
    = sqrt(2) ||A||`` from the certified ``||A||`` of the bounds row, ``abs_sigma >= || |B| ||``, ``bias_norm >=
    ||sqrt(s) b||`` over positions. ``B`` is formed in float64 (a square root and a product per entry, ``gamma_2``
    relative), so ``|B|`` is at most ``1 + 2 gamma_2`` times the computed one, entrywise; the norms are scaled by that."""
    assert row.sigma_upper is not None
    root = layer.current_step().detach().double().clamp_min(0.0).sqrt().flatten()
    scaled = layer.weight.detach().double() * root.view(-1, *[1] * (layer.weight.dim() - 1))
    inflate = 1.0 + 2.0 * gamma(2, torch.float64) + FP64_SLACK
    conv = isinstance(layer, SLLConv2d)
    positions = layer.input_size[0] * layer.input_size[1] if conv else 1
    base = _cpl_constants(row, layer)  # summand counts, width, || |W| || and ||b|| (unscaled)
    return StageConstants(
        row.name, row.kind, row.bound, width=base.width, step=1.0,
        sigma=round_up(math.sqrt(2.0) * row.sigma_upper * (1.0 + 2.0 * unit_roundoff(torch.float64))),
        abs_sigma=round_up(_abs_norm_upper(scaled.abs().sum(dim=(2, 3)) if conv else scaled.abs()) * inflate),
        bias_norm=round_up(float((layer.bias.detach().double() * root).norm()) * math.sqrt(positions) * inflate),
        terms_w=base.terms_w, terms_wt=base.terms_wt, taps=base.taps, step_max=round_up(float(root.max()) ** 2) if root.numel() else 0.0,
        weight_abs=base.abs_sigma, bias_abs=base.bias_norm,
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


# --- measured norms -----------------------------------------------------------------------------------
@dataclass
class BodyTrace:
    """Per-sample norms measured while running the body: ``inputs[k]`` of stage k's input (measured
    stages only), ``hidden[k]`` of a CPL layer's hidden units, ``features`` of the body's output."""

    inputs: dict[int, torch.Tensor]
    hidden: dict[int, torch.Tensor]
    features: torch.Tensor

    def rows(self, index: torch.Tensor) -> BodyTrace:
        """The same norms for the points ``index`` only."""
        return BodyTrace({k: v[index] for k, v in self.inputs.items()}, {k: v[index] for k, v in self.hidden.items()},
                         self.features[index])


# --- per-stage bounds ---------------------------------------------------------------------------------
def stage_error(c: StageConstants, a: torch.Tensor, hidden: torch.Tensor | None, arithmetic: Arithmetic) -> torch.Tensor:
    """Bound of ``||computed stage output - exact stage(computed input)||`` for input norm ``a``.

    ``hidden`` is the measured norm of a CPL layer's computed hidden units (``None``: bounded from ``a``).
    Every operation may also underflow, by at most the smallest normal number ``eta`` per operation: a
    value of the stage takes part in at most ``terms_w + terms_wt + 6`` of them, so these absolute errors
    add at most ``(terms_w + terms_wt + 6) eta`` per value and that times ``sqrt(width)`` in norm.
    """
    if not c.measured:
        return torch.zeros_like(a)
    storage = arithmetic.storage
    underflow = (c.terms_w + c.terms_wt + 6) * smallest_normal(storage) * math.sqrt(c.width)
    if c.kind == "normalize":
        return gamma(2, storage) * (a + c.bias_norm) * c.inv_std + underflow
    if c.kind == "block-sum-pool":
        return gamma(c.terms_w + 2, storage) * a + underflow
    if c.is_sll:
        underflow = sll_underflow(c, storage)
    e_q = hidden_error(c, a, arithmetic)
    r_computed = hidden if hidden is not None else c.sigma * a + c.bias_norm + e_q
    r_exact = torch.minimum(c.sigma * a + c.bias_norm, r_computed + e_q)  # ||relu(W x + b)|| <= ||W x + b||
    carried = (1.0 + unit_roundoff(storage)) ** 2 * abs(c.step) * c.sigma * e_q  # the hidden units' error through h W^T
    return carried + update_error(c, a, r_computed, r_exact, arithmetic) + underflow


def hidden_error(c: StageConstants, a: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """Bound of ``||q~ - (W x + b)||`` for a CPL layer's computed pre-activations ``q~`` (docs/math.md 6.2).

    Any order: ``n + 1`` terms (the bias inside the sum or added after it), ``gamma_{n+1} (|W| |x| + |b|)``.
    float64 accumulation: the same sum in float64, then one rounding to float32, ``u ||q64||``.
    By taps: each tap's ``n / taps`` products summed in float32 (``gamma_{n/taps} |W| |x|`` over all taps), the
    partial sums and the bias added in float64, then one rounding to float32.
    """
    if arithmetic.by_taps:  # float32 sums of terms_w / taps products per tap; the taps and the bias in float64
        per_tap = gamma(c.terms_w // c.taps, arithmetic.storage) * c.abs_sigma * a
        sum64 = gamma(c.taps + 1, torch.float64) * (c.abs_sigma * a + per_tap + c.bias_norm) + per_tap
    elif arithmetic.exact_products:
        sum64 = gamma(c.terms_w + 1, torch.float64) * (c.abs_sigma * a + c.bias_norm)
    else:
        return gamma(c.terms_w + 1, arithmetic.storage) * (c.abs_sigma * a + c.bias_norm)
    return unit_roundoff(arithmetic.storage) * (c.sigma * a + c.bias_norm + sum64) + sum64


def update_error(c: StageConstants, a: torch.Tensor, r_computed: torch.Tensor, r_exact: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """Bound of ``||z~ - (x - h W^T r~)||`` for the computed update ``z~`` from the computed hidden units ``r~``
    (norm ``r_computed``; the exact hidden units' norm is at most ``r_exact``), docs/math.md 6.2.

    Any order: ``W^T r~`` (``gamma_m |W|^T |r~|``), times ``h`` (or ``h`` folded into the weights), ``x`` minus
    that, each rounded. float64 accumulation: the whole right-hand side in float64, one rounding to float32.
    An SLL layer (scaled form, ``h = 1``) multiplies first: ``x - W^T (s * r~)`` (``step_product_error``).
    """
    u, h, s, sa = unit_roundoff(arithmetic.storage), abs(c.step), c.sigma, c.abs_sigma
    if arithmetic.exact_products:
        inner = h * gamma(c.terms_wt, torch.float64) * sa * r_computed + 3.0 * unit_roundoff(torch.float64) * (a + h * s * r_computed)
        return u * (a + h * s * r_computed + inner) + inner
    e_s = gamma(c.terms_wt, arithmetic.storage) * sa * r_computed  # W^T r~
    e_t = (1.0 + u) * h * e_s + step_product_error(c, r_computed, u)  # the product by the step
    return (1.0 + u) * e_t + u * (a + h * s * r_exact)  # x - t


def step_product_error(c: StageConstants, r_computed: torch.Tensor, u: float) -> torch.Tensor:
    """The rounding of the product by the step, carried by ``W^T``: ``u |h| || |W| || ||r~||``.

    CPL: ``h (W^T r~)`` rounded, or ``(h W)^T r~`` with ``h W`` rounded entrywise. SLL (scaled form, ``h = 1``):
    each ``s_i r~_i`` is one rounding, ``s_i r~_i (1 + d_i)``, so the error's image is ``W^T diag(s) diag(d) r~ =
    B^T diag(d) diag(sqrt s) r~`` (diagonal matrices commute), of norm at most ``u ||B|| ||sqrt(s) r~||``.
    """
    return u * abs(c.step) * c.abs_sigma * r_computed


def stage_peak(c: StageConstants, a: torch.Tensor) -> torch.Tensor:
    """Bound of the magnitude of every value the stage computes, partial sums of its dot products included,
    from an input of norm ``a`` (each entry of a vector is at most its norm; ``|| |W| ||`` bounds ``||W||``)."""
    if c.is_sll:  # unscaled: W x + b, s * r, W^T (s * r), x minus that
        hidden = c.weight_abs * a + c.bias_abs
        return a + hidden * (1.0 + c.step_max) + c.weight_abs * c.step_max * hidden
    if c.kind == "normalize":
        return (a + c.bias_norm) * max(c.inv_std, 1.0)
    if c.kind == "block-sum-pool":
        return math.sqrt(c.terms_w) * a
    if c.is_cpl:
        hidden = c.abs_sigma * a + c.bias_norm  # partial sums of W x + b, and so the hidden units
        return a + hidden + c.abs_sigma * hidden * (1.0 + abs(c.step))  # W^T r, h times it, x minus that
    return a


def overflows(peak: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """Where a computation in ``arithmetic`` whose exact values stay below ``peak`` might overflow. Rounding
    moves a value by far less than a factor 2, so staying below half the largest finite number is enough."""
    return ~(peak * 2.0 < torch.finfo(arithmetic.storage).max)


def sll_underflow(c: StageConstants, dtype: torch.dtype) -> float:
    """An SLL layer's absolute errors near underflow (at most ``eta`` per operation, per value): ``W x`` (``n1`` per
    unit) and ``+ b`` scaled by ``sqrt(s)`` and carried by ``B^T``, the product ``s * r`` carried by ``W^T``, ``W^T``'s
    own ``n2`` per output and the subtraction; each vector has at most ``width`` values."""
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


def stage_offset(c: StageConstants) -> float:
    """Bound of the norm of the stage's exact output at input zero: its output norm is at most
    ``lipschitz * ||x|| + stage_offset`` (the mean for the normalisation, ``h W^T relu(b)`` for a CPL layer)."""
    if c.kind == "normalize":
        return c.bias_norm * c.inv_std
    if c.is_cpl:
        return abs(c.step) * c.sigma * c.bias_norm
    return 0.0


# --- whole body -----------------------------------------------------------------------------------------
def body_error(constants: ErrorModel, trace: BodyTrace, arithmetic: Sequence[Arithmetic]) -> torch.Tensor:
    """Per-sample bound of ``||computed features - exact features(computed input)||``; stage k ran in
    ``arithmetic[k]``."""
    total = torch.zeros_like(trace.features)
    for index, c in enumerate(constants.stages):
        total = total * c.lipschitz
        if c.measured:
            total = total + stage_error(c, trace.inputs[index], trace.hidden.get(index), arithmetic[index])
    return total * (1.0 + FP64_SLACK)


def ball_body_error(
    constants: ErrorModel, trace: BodyTrace, here: Sequence[Arithmetic], there: Sequence[Arithmetic], distance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E, Phi)``: bounds of the features' rounding error and of the computed features' norm when the body
    runs in the arithmetic ``there`` at any input within ``distance`` (per sample) of the one traced in
    the arithmetic ``here``.

    Stage k's computed input there has norm at most its measured norm here, plus the exact map's
    Lipschitz constant times ``distance``, plus the rounding errors of both computations up to stage k.
    The rounding model holds only while nothing overflows: where some value computed there might,
    ``E`` is infinite (the pass here was run, so its own overflows show as non-finite values).
    """
    error_here = torch.zeros_like(trace.features)
    error_there = torch.zeros_like(trace.features)
    overflow = torch.zeros_like(trace.features, dtype=torch.bool)
    lipschitz = 1.0
    for index, c in enumerate(constants.stages):
        error_here, error_there = error_here * c.lipschitz, error_there * c.lipschitz
        if c.measured:
            a = trace.inputs[index]
            a_there = a + lipschitz * distance + error_here + error_there
            error_here = error_here + stage_error(c, a, trace.hidden.get(index), here[index])
            error_there = error_there + stage_error(c, a_there, None, there[index])
            overflow |= overflows(stage_peak(c, a_there), there[index])
        lipschitz *= c.lipschitz
    features = trace.features + lipschitz * distance + error_here + error_there
    error_there = torch.where(overflow, torch.full_like(error_there, math.inf), error_there)
    return error_there * (1.0 + FP64_SLACK), features * (1.0 + FP64_SLACK)


# --- head --------------------------------------------------------------------------------------------
def exact_head_logits(constants: ErrorModel, features: torch.Tensor, features_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, error)``: the head applied in float64 to ``features`` (norm at most ``features_norm``),
    and a per-logit bound of its distance to the exact head applied to the same features."""
    head = constants.head
    feats = features.double()
    if head.kind == "truncation":
        logits = feats[:, : head.row_error.shape[0]]
        return logits, torch.zeros_like(logits)
    assert head.exact_weight is not None
    logits = F.linear(feats, head.exact_weight.to(feats.device), head.bias.to(feats.device))
    phi = features_norm[:, None]
    own = gamma(head.features + 3, torch.float64)
    error = own * phi + gamma(head.features + 1, torch.float64) * ((1.0 + own) * phi + head.bias.abs().to(feats.device))
    return logits, error * (1.0 + FP64_SLACK)


def head_error(constants: ErrorModel, features_norm: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """Per-logit bound (B, K) of a float32 head's own rounding on features of norm ``features_norm``: the
    rows it normalised in float32, and its dot products (any order, or float64 accumulation)."""
    head = constants.head
    if head.kind == "truncation":
        zeros = torch.zeros(features_norm.shape[0], head.row_error.shape[0], dtype=torch.float64, device=features_norm.device)
        return torch.where(overflows(features_norm, arithmetic)[:, None], math.inf, zeros)
    phi = features_norm[:, None]
    row_error, row_norm, bias = (t.to(features_norm.device) for t in (head.row_error, head.row_norm, head.bias))
    if arithmetic.exact_products:
        g64 = gamma(head.features + 1, torch.float64)
        rounding = unit_roundoff(torch.float32) * (1.0 + g64) + g64
    else:
        rounding = gamma(head.features + 1, torch.float32)
    error = (row_error * phi + rounding * (row_norm * phi + bias.abs())) * (1.0 + FP64_SLACK)
    return torch.where(overflows(row_norm * phi + bias.abs(), arithmetic), math.inf, error)


# --- a runtime's allowance from the input norm alone ------------------------------------------------------------
def runtime_allowance(
    constants: ErrorModel, origin: BodyTrace, pairs: torch.Tensor, row_norm: torch.Tensor, bias: torch.Tensor, limit: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: for any float32 runtime that rounds every operation correctly and sums in any order, the
    computed ``f_t - f_j`` lies within ``A[t, j] ||x|| + B[t, j]`` of the exact function's at every input with
    ``||x|| <= limit`` (docs/deploy.md). ``origin`` is a float64 trace of the body at the zero input: an input
    of norm ``||x||`` lies within that distance of it, so the ball bound around it applies. ``pairs[t, j]``
    bounds ``||w_t - w_j||`` for the head's rows (sqrt 2 for a truncation head), ``row_norm`` and ``bias``
    those rows' norms and the biases (zero for a truncation head).

    Every bound on the way is affine in the distance, so two evaluations give it exactly; the slope is
    taken over ``[0, limit]`` and ``[0, 1]`` (the larger), and both constants are rounded up by 1e-9.
    """
    g = gamma(constants.head.features + 1, torch.float32)
    here, there = constants.plan(FLOAT64), constants.plan(FLOAT32)

    def pair_error(norm: float) -> torch.Tensor:
        error, features = ball_body_error(constants, origin, here, there, torch.tensor([norm], dtype=torch.float64))
        logits = row_norm * features + bias.abs()
        head = torch.where(overflows(logits, FLOAT32), math.inf, g * logits)
        return (pairs * error + head[:, None] + head[None, :]).fill_diagonal_(0.0)

    base, at_one, at_limit = pair_error(0.0), pair_error(1.0), pair_error(limit)
    if not bool(torch.isfinite(at_limit).all()):
        raise CplCertError(f"float32 values of this network may overflow at inputs of norm {limit:.4g}; no runtime allowance exists")
    slope = torch.maximum(at_one - base, (at_limit - base) / limit)
    return slope * (1.0 + 1e-9), base * (1.0 + 1e-9)
