"""Convolutions as matrix products: float64 3x3 convolutions on the CPU, several times faster than PyTorch's
own (oneDNN has no float64 kernels, and the fallback works image by image), and float32 convolutions whose
sums are split by tap (``conv2d_by_taps``: a tighter rounding bound, and faster than oneDNN on the paper's
layer shapes).

Both forms compute every output as a sum of the same ``C_in * k * k`` products as ``F.conv2d``, in another
order, so the rounding bound of docs/math.md 6.1 (any summation order) covers them. ``conv2d`` picks the
form whose intermediate tensor is smaller:

* *im2col*: stack the ``k * k`` shifted copies of the (zero-padded) input, ``(B, k k C_in, H W)``, and
  multiply by the ``C_out x k k C_in`` kernel matrix;
* *shift-add*: multiply the padded input by the ``k k C_out x C_in`` matrix of the taps, ``(B, k k C_out, ...)``,
  and add the ``k * k`` shifted planes of each tap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 8
"""Images per matrix product: keeps the intermediate tensor in cache (8 was fastest on cpl-s and cpl-xs layer shapes)."""


def conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=padding)`` (stride 1, square odd kernel) for float64 CPU tensors."""
    if x.shape[0] > CHUNK:
        return torch.cat([conv2d(part, weight, padding) for part in x.split(CHUNK)])
    c_out, c_in = weight.shape[:2]
    form = _shift_add if c_out < c_in else _im2col
    return form(F.pad(x, (padding,) * 4), weight, x.shape[2], x.shape[3])


def conv2d_by_taps(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """``conv2d(x, weight, bias)`` for float32 ``x`` and ``weight``, returned in float64: each tap's products
    are summed in float32 (``C_in`` terms, any order), and the ``k * k`` partial sums and the bias in float64.
    Its rounding is ``gamma_{C_in}`` of the products instead of ``gamma_{k k C_in}`` (docs/math.md 6.2), and
    where ``C_out`` is much smaller than ``C_in`` (the paper's convolutions: 5 against 45 to 120) it runs faster
    than oneDNN's float32 convolution."""
    if x.shape[0] > CHUNK:
        return torch.cat([conv2d_by_taps(part, weight, bias, padding) for part in x.split(CHUNK)])
    c_out, c_in, k, _ = weight.shape
    padded = F.pad(x, (padding,) * 4)
    batch, _, rows, cols = padded.shape
    height, width = rows - k + 1, cols - k + 1
    taps = weight.permute(2, 3, 0, 1).reshape(k * k * c_out, c_in)
    planes = torch.matmul(taps, padded.reshape(batch, c_in, rows * cols)).view(batch, k, k, c_out, rows, cols)
    out = planes[:, 0, 0, :, :height, :width].double() + bias.double().view(1, -1, 1, 1)
    for i in range(k):
        for j in range(k):
            if i or j:
                out += planes[:, i, j, :, i : i + height, j : j + width]
    return out


def conv_transpose2d(y: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """``F.conv_transpose2d(y, weight, padding=padding)``: the convolution with the flipped, transposed kernel."""
    return conv2d(y, weight.transpose(0, 1).flip(2, 3), weight.shape[2] - 1 - padding)


def _im2col(padded: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    c_out, c_in, k, _ = weight.shape
    batch = padded.shape[0]
    columns = torch.cat([padded[:, :, i : i + height, j : j + width] for i in range(k) for j in range(k)], dim=1)
    matrix = weight.permute(0, 2, 3, 1).reshape(c_out, k * k * c_in)  # (out, (tap, in)), taps in the order above
    return torch.matmul(matrix, columns.reshape(batch, k * k * c_in, height * width)).view(batch, c_out, height, width)


def _shift_add(padded: torch.Tensor, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    c_out, c_in, k, _ = weight.shape
    batch, _, rows, cols = padded.shape
    taps = weight.permute(2, 3, 0, 1).reshape(k * k * c_out, c_in)  # ((tap, out), in)
    planes = torch.matmul(taps, padded.reshape(batch, c_in, rows * cols)).view(batch, k, k, c_out, rows, cols)
    out = planes[:, 0, 0, :, :height, :width].clone()
    for i in range(k):
        for j in range(k):
            if i or j:
                out += planes[:, i, j, :, i : i + height, j : j + width]
    return out
