"""cpl_cert.conv64 against PyTorch's own float64 convolutions: the same sums of products, so the same values
up to float64 rounding, for both forms (im2col and shift-add), odd sizes, chunked batches and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cpl_cert import conv64


@pytest.mark.parametrize("c_in, c_out, size", [(3, 5, (7, 9)), (5, 3, (8, 8)), (4, 4, (1, 6)), (6, 2, (11, 5))])
def test_matches_pytorch_in_both_directions(c_in, c_out, size):
    generator = torch.Generator().manual_seed(c_in * 10 + c_out)
    x = torch.randn((conv64.CHUNK * 2 + 3, c_in, *size), generator=generator, dtype=torch.float64)
    y = torch.randn((x.shape[0], c_out, *size), generator=generator, dtype=torch.float64)
    kernel = torch.randn((c_out, c_in, 3, 3), generator=generator, dtype=torch.float64)
    scale = float(x.abs().max() * kernel.abs().sum(dim=(1, 2, 3)).max())
    assert torch.allclose(conv64.conv2d(x, kernel, 1), F.conv2d(x, kernel, padding=1), rtol=0, atol=1e-13 * scale)
    assert torch.allclose(conv64.conv_transpose2d(y, kernel, 1), F.conv_transpose2d(y, kernel, padding=1), rtol=0, atol=1e-13 * scale)


def test_gradients_and_forward_mode_match():
    """The float64 model copy feeds autograd (the Lipschitz lower bound uses jvp and vjp through it)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((3, 4, 6, 6), generator=generator, dtype=torch.float64)
    kernel = torch.randn((2, 4, 3, 3), generator=generator, dtype=torch.float64)
    tangent = torch.randn_like(x)
    with warnings.catch_warnings():  # torch.func's own notice about torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        ours = torch.func.jvp(lambda v: conv64.conv2d(v, kernel, 1), (x,), (tangent,))[1]
        theirs = torch.func.jvp(lambda v: F.conv2d(v, kernel, padding=1), (x,), (tangent,))[1]
    assert torch.allclose(ours, theirs, atol=1e-12)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(conv64.conv_transpose2d(x[:, :2], kernel, 1).square().sum(), x)
    (expected,) = torch.autograd.grad(F.conv_transpose2d(x[:, :2], kernel, padding=1).square().sum(), x)
    assert torch.allclose(grad, expected, atol=1e-12)
