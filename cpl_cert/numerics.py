"""Floating-point facts the certificates rest on: unit roundoffs, error constants, strict math modes.

Every bound cpl-cert computes about rounding uses the standard model of IEEE arithmetic
(``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``) plus an absolute term for underflow, and the classic
dot-product bound ``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_n sum |a_i b_i|`` with
``gamma_n = n u / (1 - n u)``, which holds for any order of summation, with or without fused
multiply-adds (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1).
docs/math.md derives the per-layer bounds from these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import CplCertError

FP64_SLACK = 2.0**-40
"""Relative slack applied to cpl-cert's own float64 bound arithmetic (chains of at most a few hundred
float64 operations on non-negative numbers, each off by at most 2^-53 relative): rounds bounds
outward so that they stay bounds."""


@dataclass(frozen=True)
class Arithmetic:
    """How a network stage is computed, for its rounding bound (docs/math.md 6.1).

    ``storage`` is the precision every elementwise result and every stored activation is rounded to.
    ``accumulate`` is the precision of dot-product sums (matrix products and convolutions): equal to
    ``storage`` for a plain pass (any summation order), or float64 over float32 storage, where the
    products of float32 numbers are exact in float64, the sums run in float64 and each result is rounded
    once to float32 (cpl-cert's float32 network).
    """

    name: str
    storage: torch.dtype
    accumulate: torch.dtype
    by_taps: bool = False  # convolutions' W x summed per tap in ``storage``, the taps' sums in ``accumulate``

    @property
    def exact_products(self) -> bool:
        """Dot products from exact float64 products of float32 operands, summed in float64."""
        return self.storage == torch.float32 and self.accumulate == torch.float64 and not self.by_taps


FLOAT32 = Arithmetic("float32", torch.float32, torch.float32)
"""Plain float32: any correctly rounded runtime, dot products in any order (PyTorch's own ``model(x)``, ONNX Runtime)."""
FLOAT32_ACC64 = Arithmetic("float32, float64 accumulation", torch.float32, torch.float64)
"""cpl-cert's float32 network: float32 activations, every product and sum of a dot product in float64."""
FLOAT32_BY_TAPS = Arithmetic("float32, convolutions summed per tap", torch.float32, torch.float64, by_taps=True)
"""cpl-cert's first pass on convolutions with few outputs: ``W x + b`` as float32 per-tap sums added in float64
(``conv64.conv2d_by_taps``), everything else plain float32."""
FLOAT64 = Arithmetic("float64", torch.float64, torch.float64)
"""float64 throughout (cpl-cert's re-evaluation of the exact function)."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: the largest relative error of one correctly rounded operation in ``dtype``."""
    if dtype == torch.float32:
        return 2.0**-24
    if dtype == torch.float64:
        return 2.0**-53
    raise CplCertError(f"certificates are computed in float32 or float64, not {dtype}")


def smallest_normal(dtype: torch.dtype) -> float:
    """Absolute error of one operation near underflow (covers flush-to-zero as well as gradual underflow)."""
    return float(torch.finfo(dtype).tiny)


def gamma(n: int, dtype: torch.dtype) -> float:
    """``gamma_n = n u / (1 - n u)``: relative error bound of an ``n``-term dot product in ``dtype``."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise CplCertError(f"a sum of {n} terms is too long for a rounding bound in {dtype}")
    return nu / (1.0 - nu)


def round_up(value: float) -> float:
    """``value`` moved outward by ``FP64_SLACK`` (for a non-negative upper bound)."""
    return value * (1.0 + FP64_SLACK)


def norm_upper(x: torch.Tensor) -> torch.Tensor:
    """Per-sample upper bound of ``||x||_2`` (rows of ``x``) as float64, at every scale.

    Measured in ``x``'s own precision (a float64 copy of every activation would cost a quarter of the
    forward pass): each square is rounded (relative ``u``, or absolutely by at most ``eta``, the smallest
    normal number, where it underflows), the ``n`` squares are summed in any order (``gamma_n``) and the root
    taken (``u``). Hence ``||x||^2 <= S (1 + gamma_{n+2}) + n eta`` for the computed sum of squares ``S``:
    the absolute floor ``n eta`` keeps the bound valid when squares underflow (entries below about 1e-19
    in float32, 1e-154 in float64), where the measured norm alone can be 0 or far too low. docs/math.md 6.1.
    An overflowing square gives an infinite bound, which callers treat as "evaluate this point again".
    """
    flat = x.flatten(1)
    n = flat.shape[1]
    measured = torch.linalg.vector_norm(flat, dim=1).double()
    squares = measured.square() * (1.0 + gamma(n + 2, flat.dtype)) + n * smallest_normal(flat.dtype)
    return squares.sqrt() * (1.0 + FP64_SLACK)


@contextlib.contextmanager
def strict_math() -> Iterator[None]:
    """Full-precision float32 math while certificates are computed; the previous settings come back after.

    Turns off TF32 and other reduced-precision float32 modes (CUDA matmul, cuDNN, oneDNN), NNPACK
    (its convolutions use Winograd/FFT algorithms, whose rounding the dot-product bound does not cover)
    and cuDNN (same reason: it may pick Winograd or FFT kernels). Convolutions then run as direct sums
    (oneDNN direct, or im2col + GEMM), which the bounds of docs/math.md cover.
    """
    cudnn = torch.backends.cudnn
    saved_cudnn = cudnn.enabled
    nnpack = getattr(torch.backends, "nnpack", None)
    try:
        cudnn.enabled = False
        with _no_nnpack(nnpack), _ieee_precision():
            yield
    finally:
        cudnn.enabled = saved_cudnn


def _no_nnpack(nnpack: object) -> contextlib.AbstractContextManager[object]:
    flags = getattr(nnpack, "flags", None)
    return flags(enabled=False) if callable(flags) else contextlib.nullcontext()


_PRECISION_PATHS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


@contextlib.contextmanager
def _ieee_precision() -> Iterator[None]:
    """Every float32 precision knob torch has set to full IEEE; torch versions without the
    ``fp32_precision`` settings get their TF32 flags turned off instead."""
    backends = torch.backends
    if not hasattr(backends, "fp32_precision"):
        saved_flags = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved_flags[:2]
            torch.set_float32_matmul_precision(saved_flags[2])
        return
    knobs = [obj for obj in map(_backend, _PRECISION_PATHS) if obj is not None and hasattr(obj, "fp32_precision")]
    saved = [(obj, obj.fp32_precision) for obj in knobs]
    try:
        for obj in knobs:
            obj.fp32_precision = "ieee"
        yield
    finally:
        for obj, value in saved:
            obj.fp32_precision = value


def _backend(path: str) -> object | None:
    obj: object | None = torch.backends
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part, None)
    return obj
