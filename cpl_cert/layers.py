"""Building blocks of a CPL network: the two Convex Potential Layers and the 1-Lipschitz glue around them.

A CPL layer computes ``z = x - h * W^T relu(W x + b)``. Its Jacobian ``I - h W^T D W`` has
eigenvalues in ``[1 - h s^2, 1]`` with ``s = ||W||_2``, so the layer is 1-Lipschitz when
``h <= 2 / s^2`` (see docs/math.md). During training ``s`` is estimated by one warm-started
power iteration per step; ``freeze`` fixes the step for good (see ``cpl_cert.freezing``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import conv64
from .errors import CplCertError
from .numerics import FP64_SLACK, gamma, round_up

STEP_EPSILON = 1e-4
"""Added to ``sigma^2`` in the step ``h = 2 / (sigma^2 + eps)``, as in the paper."""


class _PotentialBase(nn.Module):
    """What every potential layer (CPL or SLL) shares: the operator ``W``, the hidden units, the frozen flag.

    Subclasses provide ``_apply_w`` (W x), ``_apply_wt`` (W^T y), ``_affine`` (W x + b in one call) and the
    per-layer scale inference applies: ``current_scale`` (CPL: the step h; SLL: the per-unit rescaling t).
    """

    weight: nn.Parameter
    bias: nn.Parameter
    u: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self.register_load_state_dict_post_hook(_sync_frozen_flag)

    # --- operator -----------------------------------------------------------------------
    def _apply_w(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply_wt(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` in one call, the bias inside the product (training only: ``hidden`` adds it separately,
        one rounding after the sum, as the certificates' rounding model assumes)."""
        raise NotImplementedError

    def _training_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The memory layout training runs in (the identity here)."""
        return x

    def _unit_view(self, values: torch.Tensor) -> torch.Tensor:
        """A per-hidden-unit vector shaped to broadcast over the hidden units (the identity for dense layers)."""
        return values

    def _bias_view(self) -> torch.Tensor:
        return self._unit_view(self.bias)

    @property
    def frozen(self) -> bool:
        """True once ``freeze`` fixed the layer's scale; any training-mode forward unfreezes the layer."""
        return self._frozen

    def _stored_frozen(self) -> bool:
        """Whether the stored buffers describe a frozen layer (read after ``load_state_dict``)."""
        raise NotImplementedError

    def current_scale(self) -> torch.Tensor:
        """The scale inference applies now (CPL: the step, a scalar; SLL: the rescaling t, one per hidden unit)."""
        raise NotImplementedError

    def set_frozen_scale(self, value: torch.Tensor) -> None:
        """Fix the scale inference applies (what ``current_scale`` returns) for good."""
        raise NotImplementedError

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(W x + b)``: the layer's hidden units (the gradient of the potential is ``W^T`` of them)."""
        return F.relu(self._apply_w(x, self.weight) + self._bias_view())


class _CPLBase(_PotentialBase):
    """Shared logic of the dense and convolutional CPL layers: step selection and power iteration.

    Buffers: ``u`` (the power-iteration vector, shaped like one input of the layer) and ``step``
    (the frozen step, 0 while the layer is not frozen).
    """

    step: torch.Tensor

    def set_frozen_step(self, step: float) -> None:
        """Fix the step used by inference (called by ``cpl_cert.freeze``); a non-finite step is refused."""
        if not math.isfinite(step):
            raise ValueError(f"a CPL step must be a finite number, got {step}")
        self.step.fill_(step)
        self._frozen = True

    def _stored_frozen(self) -> bool:
        return bool(self.step.item() > 0)

    def current_scale(self) -> torch.Tensor:
        return self.current_step()

    def set_frozen_scale(self, value: torch.Tensor) -> None:
        self.set_frozen_step(float(value))

    # --- step ---------------------------------------------------------------------------
    def _sigma_estimate(self) -> torch.Tensor:
        """``||W u||`` for the stored unit vector ``u``: the power-iteration estimate of ``||W||_2``."""
        weight = self.weight.float()
        return self._apply_w(self.u, weight).flatten().norm()

    def _training_sigma(self) -> torch.Tensor:
        """One warm-started power iteration (vector updated in place), gradient through sigma."""
        with torch.no_grad():
            weight = self.weight.detach().float()
            v = self._apply_wt(self._apply_w(self.u, weight), weight)
            v = v / v.flatten().norm().clamp_min(1e-30)
            self.u.copy_(v)
        return self._sigma_estimate()

    def current_step(self) -> torch.Tensor:
        """The step inference uses now: the frozen one, or ``2 / (sigma_hat^2 + eps)`` if not frozen."""
        if self._frozen:
            return self.step
        with torch.no_grad():
            sigma = self._sigma_estimate()
        return 2.0 / (sigma**2 + STEP_EPSILON)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval: ``update(x, hidden(x), step)``, what certification runs. Training: the same function computed
        faster (bias inside the product, ReLU in place, the step folded into ``W^T``'s weights, channels-last
        convolutions on the CPU), equal to the eval form up to float32 rounding."""
        if not self.training:
            return self.update(x, self.hidden(x), self.current_step())
        self._frozen = False
        with _no_autocast(x.device.type):  # sigma in float32 even under --bf16
            sigma = self._training_sigma()
        step = 2.0 / (sigma**2 + STEP_EPSILON)
        x = self._training_layout(x)
        hidden = F.relu(self._affine(x), inplace=True)
        # x - h W^T r with h folded into a scaled copy of W: the scalar costs no pass over the activations,
        # forward or backward (its gradient comes from the small weight gradient of W^T).
        return x + self._apply_wt(hidden, self.weight * -step)

    def update(self, x: torch.Tensor, hidden: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``x - h W^T hidden``: the gradient step. ``forward`` is ``update(x, hidden(x), step)``; certification
        runs the same two calls to measure the hidden units' norm for its rounding bound."""
        return x - step.to(x.dtype) * self._apply_wt(hidden, self.weight)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[object]:
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _sync_frozen_flag(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict``: a CPL layer with a positive stored step, or an SLL layer with a positive
    stored rescaling, is frozen."""
    if isinstance(module, _PotentialBase):
        module._frozen = module._stored_frozen()


def _init_weight_and_bias(weight: nn.Parameter, bias: nn.Parameter, fan_in: int) -> None:
    """PyTorch's default init (kaiming-uniform weights, bias U(+-1/sqrt(fan_in))), as in the paper's code."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(bias, -bound, bound)


class _DenseOperator:
    """``W`` a matrix ``(inner, features)``: the operator half of a dense layer (CPL or SLL)."""

    weight: nn.Parameter
    bias: nn.Parameter

    def _apply_w(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _apply_wt(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(y, weight.t())


class _ConvOperator:
    """``W`` a 'same' convolution with kernel ``(inner, channels, k, k)``: the operator half of a conv layer."""

    weight: nn.Parameter
    bias: nn.Parameter
    padding: int

    def _apply_w(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if _float64_cpu(x, weight):
            return conv64.conv2d(x, weight, self.padding)
        return F.conv2d(x, weight, padding=self.padding)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)

    def _training_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last activations on the CPU, where oneDNN's convolutions and their backward run faster on
        them (a no-op after the first layer, whose output keeps the layout); other devices keep theirs."""
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def _apply_wt(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if _float64_cpu(y, weight):
            return conv64.conv_transpose2d(y, weight, self.padding)
        return F.conv_transpose2d(y, weight, padding=self.padding)

    def _unit_view(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, 1, 1)


def _conv_setup(layer: nn.Module, channels: int, inner: int, input_size: tuple[int, int], kernel_size: int) -> None:
    """Sizes, padding and an empty kernel and bias of a conv layer (CPL or SLL)."""
    if kernel_size % 2 != 1:
        raise ValueError("kernel_size must be odd so that 'same' padding keeps the size")
    layer.channels, layer.inner, layer.kernel_size = channels, inner, kernel_size
    layer.input_size = tuple(input_size)
    layer.padding = kernel_size // 2
    layer.weight = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
    layer.bias = nn.Parameter(torch.empty(inner))


def _conv_repr(layer: nn.Module) -> str:
    return (
        f"channels={layer.channels}, inner={layer.inner}, kernel_size={layer.kernel_size}, "
        f"input_size={layer.input_size}, frozen={layer.frozen}"
    )


class CPLLinear(_DenseOperator, _CPLBase):
    """Dense Convex Potential Layer on vectors of size ``features`` with ``inner`` hidden units."""

    def __init__(self, features: int, inner: int) -> None:
        super().__init__()
        self.features, self.inner = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(inner))
        _init_weight_and_bias(self.weight, self.bias, features)
        self.register_buffer("u", F.normalize(torch.randn(1, features), dim=1))
        self.register_buffer("step", torch.zeros(()))

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}, frozen={self.frozen}"


class CPLConv2d(_ConvOperator, _CPLBase):
    """Convolutional CPL layer: 3x3 kernel ``(inner, channels, 3, 3)``, padding 1, stride 1.

    ``input_size`` is the spatial size ``(H, W)`` the layer sees; the power-iteration vector has that
    size so that the zero-padded operator at that resolution is the one estimated.
    """

    def __init__(self, channels: int, inner: int, input_size: tuple[int, int], kernel_size: int = 3) -> None:
        super().__init__()
        _conv_setup(self, channels, inner, input_size, kernel_size)
        _init_weight_and_bias(self.weight, self.bias, channels * kernel_size * kernel_size)
        u = torch.randn(1, channels, *self.input_size)
        self.register_buffer("u", u / u.norm())
        self.register_buffer("step", torch.zeros(()))

    def extra_repr(self) -> str:
        return _conv_repr(self)


def _float64_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float64 convolutions on the CPU run as matrix products (``cpl_cert.conv64``), several times faster."""
    return x.dtype == torch.float64 and weight.dtype == torch.float64 and x.device.type == "cpu"


CPL_LAYER_TYPES = (CPLLinear, CPLConv2d)


# --- SLL layers -----------------------------------------------------------------------------------------
def sll_rescaling(cross: torch.Tensor, q_param: torch.Tensor) -> torch.Tensor:
    """``t_i = q_i / sum_j C_ij q_j`` with ``q = exp(q_param)``, 0 where the sum is 0.

    ``C = |W W^T|`` (summed over spatial shifts for a convolution) is non-negative. ``q`` is scaled by
    ``exp(-max q_param)`` first, which ``t`` does not depend on: nothing overflows.
    """
    q = torch.exp(q_param - q_param.detach().max())
    sums = cross @ q
    positive = sums > 0
    safe = torch.where(positive, sums, torch.ones_like(sums))
    return torch.where(positive, q / safe, torch.zeros_like(sums))


class _SLLBase(_PotentialBase):
    """Shared logic of the SLL layers (Araujo et al., ICLR 2023): ``z = x - 2 W^T (t * relu(W x + b))``.

    ``t`` is ``sll_rescaling`` of ``|W W^T|`` and ``q``. With ``A = diag(sqrt t) W`` the Jacobian is
    ``I - 2 A^T D A``, so the layer is ``max(1, 2 ||A||^2 - 1)``-Lipschitz; the formula gives ``||A|| <= 1``
    in exact arithmetic, and ``freeze`` stores a float32 ``t`` whose certified ``||A||`` proves it
    (``cpl_cert.sll``). Buffers: ``u`` (unit vector of the report's estimate of ``||A||``, shaped like one
    input) and ``t`` (the frozen rescaling, zeros while not frozen); parameter ``q`` (``log`` of SLL's q).
    The eval form fits the CPL interface with a per-unit step ``2 t``: ``update(x, r, s) = x - W^T (s * r)``.
    """

    q: nn.Parameter
    t: torch.Tensor

    def cross_gram(self, weight: torch.Tensor) -> torch.Tensor:
        """``|W W^T|`` (inner x inner), summed over every spatial shift for a convolution."""
        raise NotImplementedError

    def rescaling(self, weight: torch.Tensor | None = None, q: torch.Tensor | None = None) -> torch.Tensor:
        """The SLL rescaling ``t`` of ``weight`` and ``q`` (the layer's own by default), in ``weight``'s dtype."""
        weight = self.weight if weight is None else weight
        q = self.q if q is None else q
        return sll_rescaling(self.cross_gram(weight), q.to(weight.dtype))

    def _stored_frozen(self) -> bool:
        return bool((self.t > 0).any())

    def set_frozen_t(self, t: torch.Tensor) -> None:
        """Fix the rescaling used by inference (called by ``cpl_cert.freeze``); a negative or non-finite t is refused."""
        t = t.detach().to(device=self.t.device, dtype=self.t.dtype).reshape(self.t.shape)
        if not bool(torch.isfinite(t).all() and (t >= 0).all()):
            raise ValueError("an SLL rescaling t must be finite and non-negative")
        self.t.copy_(t)
        self._frozen = True

    def current_t(self) -> torch.Tensor:
        """The rescaling inference uses now: the frozen one, or the formula's (float32) if not frozen."""
        if self._frozen:
            return self.t
        with torch.no_grad():
            return self.rescaling(self.weight.float(), self.q.float())

    def current_scale(self) -> torch.Tensor:
        return self.current_t()

    def set_frozen_scale(self, value: torch.Tensor) -> None:
        self.set_frozen_t(value)

    def current_step(self) -> torch.Tensor:
        """The per-unit step ``2 t``, shaped to broadcast over the hidden units (doubling is exact)."""
        return self._unit_view(2.0 * self.current_t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Eval: ``update(x, hidden(x), 2 t)``, what certification runs. Training: the same function computed
        faster (bias inside the product, ReLU in place, ``-2 t`` folded into the rows of ``W`` that ``W^T``
        applies, channels-last convolutions on the CPU), with the gradient through ``t``."""
        if not self.training:
            return self.update(x, self.hidden(x), self.current_step())
        self._frozen = False
        with _no_autocast(x.device.type):  # t in float32 even under --bf16
            t = self.rescaling(self.weight.float(), self.q.float())
        x = self._training_layout(x)
        hidden = F.relu(self._affine(x), inplace=True)
        rows = (-2.0 * t).view(-1, *[1] * (self.weight.dim() - 1))
        return x + self._apply_wt(hidden, self.weight * rows)

    def update(self, x: torch.Tensor, hidden: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """``x - W^T (s * hidden)`` for the per-unit step ``s = 2 t``: one rounded product per hidden unit,
        then the transposed operator (docs/math.md section 6)."""
        return x - self._apply_wt(step.to(x.dtype) * hidden, self.weight)


def _init_sll(layer: _SLLBase, fan_in: int, u_shape: tuple[int, ...]) -> None:
    """The SLL code's initialisation (Xavier-normal weights, bias U(+-1/sqrt(fan_in)), q ~ N(0, 1)) and the buffers."""
    nn.init.xavier_normal_(layer.weight)
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(layer.bias, -bound, bound)
    layer.q = nn.Parameter(torch.randn(layer.weight.shape[0]))
    u = torch.randn(u_shape)
    layer.register_buffer("u", u / u.norm())
    layer.register_buffer("t", torch.zeros(layer.weight.shape[0]))


class SLLLinear(_DenseOperator, _SLLBase):
    """Dense SLL layer on vectors of size ``features`` with ``inner`` hidden units."""

    def __init__(self, features: int, inner: int) -> None:
        super().__init__()
        self.features, self.inner = features, inner
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(inner))
        _init_sll(self, features, (1, features))

    def cross_gram(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight @ weight.t()).abs()

    def extra_repr(self) -> str:
        return f"features={self.features}, inner={self.inner}, frozen={self.frozen}"


class SLLConv2d(_ConvOperator, _SLLBase):
    """Convolutional SLL layer: kernel ``(inner, channels, 3, 3)``, padding 1, stride 1, on ``input_size`` images."""

    def __init__(self, channels: int, inner: int, input_size: tuple[int, int], kernel_size: int = 3) -> None:
        super().__init__()
        _conv_setup(self, channels, inner, input_size, kernel_size)
        _init_sll(self, channels * kernel_size * kernel_size, (1, channels, *self.input_size))

    def cross_gram(self, weight: torch.Tensor) -> torch.Tensor:
        """``sum over shifts |K * K|``: the kernel's cross-correlations ``conv2d(K, K, padding=k-1)``, absolute, summed."""
        return F.conv2d(weight, weight, padding=weight.shape[-1] - 1).abs().sum(dim=(2, 3))

    def extra_repr(self) -> str:
        return _conv_repr(self)


SLL_LAYER_TYPES = (SLLLinear, SLLConv2d)
POTENTIAL_LAYER_TYPES = CPL_LAYER_TYPES + SLL_LAYER_TYPES
"""Every layer with a frozen scale and a certified bound: CPL and SLL, dense and convolutional."""


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel. Lipschitz constant ``1 / min(std)`` (1 for mean-only)."""

    def __init__(self, mean: list[float], std: list[float] | None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        std_values = std if std is not None else [1.0] * len(mean)
        self.register_buffer("std", torch.tensor(std_values, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def lipschitz(self) -> float:
        """``1 / min(std)``, rounded up; a std that is not positive and finite has no valid bound."""
        std = self.std.detach().double()
        if not bool(torch.isfinite(std).all() and (std > 0).all()):
            raise CplCertError("the input normalisation's std must be positive and finite in every channel")
        smallest = float(std.min())
        return 1.0 if smallest == 1.0 else round_up(1.0 / smallest)


class ChannelPad(nn.Module):
    """Zero-pads the channel dimension up to ``channels``: an isometry."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        if channels < in_channels:
            raise ValueError(f"cannot pad {in_channels} channels down to {channels}")
        self.in_channels, self.channels = in_channels, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, self.channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.channels}"


class BlockSumPool(nn.AvgPool2d):
    """``AvgPool2d(k, divisor_override=k)``: a k x k block sum divided by k, which is 1-Lipschitz.

    (A k x k block sum has l2 norm k; a plain average would shrink the signal by another k.)
    Rows or columns beyond a multiple of k are dropped, a projection, so any input size works.
    """

    def __init__(self, kernel_size: int) -> None:
        super().__init__(kernel_size, divisor_override=kernel_size)


class TruncationHead(nn.Module):
    """Keeps the first ``num_classes`` coordinates: 1-Lipschitz; a logit difference is sqrt(2)-Lipschitz."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.num_classes]

    def pair_lipschitz(self) -> torch.Tensor:
        """``C[i, j]``: Lipschitz constant of ``f_i - f_j`` with respect to the head's input (sqrt 2, rounded up)."""
        k = self.num_classes
        return (1.0 - torch.eye(k, dtype=torch.float64)) * round_up(math.sqrt(2.0))

    def lipschitz(self) -> float:
        return 1.0


class LLNHead(nn.Module):
    """Last-layer-normalised linear head: rows scaled to unit norm at every forward, plus a bias.

    Not 1-Lipschitz as a whole; certificates use ``||w_i - w_j||`` per class pair instead.
    """

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.features, self.num_classes = features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, features))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def normalized_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def pair_lipschitz(self) -> torch.Tensor:
        """``C[i, j]``: upper bound of ``||w_i / ||w_i|| - w_j / ||w_j||||``, the Lipschitz constant of ``f_i - f_j``.

        Rows are normalised in float64; each normalised row is off by at most ``gamma_{n+3}`` (float64)
        in norm, which the bound adds before rounding up.
        """
        w = F.normalize(self.weight.detach().double(), dim=1)
        slack = 2.0 * gamma(self.features + 3, torch.float64)
        pairs = (w[:, None, :] - w[None, :, :]).norm(dim=-1)
        bound = (pairs + slack) * (1.0 + gamma(self.features + 2, torch.float64) + FP64_SLACK)
        return bound.fill_diagonal_(0.0)

    def lipschitz(self) -> float:
        """Spectral norm of the normalised weight (reported only; certificates use the pair constants)."""
        w = F.normalize(self.weight.detach().double(), dim=1)
        return round_up(float(torch.linalg.matrix_norm(w, ord=2)) * (1.0 + gamma(self.features + 3, torch.float64)))
