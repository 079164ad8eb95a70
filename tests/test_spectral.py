"""Certified spectral-norm bounds against exact references."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cpl_cert.spectral import conv_sigma_upper, dense_sigma_upper, power_iteration


def _conv_ops(weight):
    return (lambda x: F.conv2d(x, weight, padding=1)), (lambda y: F.conv_transpose2d(y, weight, padding=1))


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    inner=st.integers(1, 6),
    channels=st.integers(1, 6),
    size=st.sampled_from([24, 28, 32]),
)
def test_conv_upper_bound_is_above_power_iteration_and_tight(seed, inner, channels, size):
    """At the image sizes the tool is used on, the FFT bound is within 2 % (the gap shrinks like 1/size)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(inner, channels, 3, 3, generator=g, dtype=torch.float64)
    sigma_up = conv_sigma_upper(weight, (size, size))
    u0 = torch.randn(1, channels, size, size, generator=g, dtype=torch.float64)
    sigma_pi, _ = power_iteration(*_conv_ops(weight), u0, max_iters=1000, tol=0.0)
    assert sigma_up >= sigma_pi
    assert sigma_up <= 1.02 * sigma_pi


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), inner=st.integers(1, 4), channels=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6))
def test_conv_upper_bound_dominates_the_exact_operator_norm(seed, inner, channels, h, w):
    """Build the zero-padded convolution as an explicit matrix and compare with its exact SVD."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(inner, channels, 3, 3, generator=g, dtype=torch.float64)
    eye = torch.eye(channels * h * w, dtype=torch.float64).reshape(-1, channels, h, w)
    matrix = F.conv2d(eye, weight, padding=1).reshape(channels * h * w, -1).t()
    exact = torch.linalg.matrix_norm(matrix, 2).item()
    assert conv_sigma_upper(weight, (h, w)) >= exact


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 60), cols=st.integers(1, 60))
def test_dense_upper_bound_equals_exact_norm(seed, rows, cols):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    exact = torch.linalg.matrix_norm(weight.double(), 2).item()
    bound = dense_sigma_upper(weight)
    assert bound >= exact
    assert abs(bound - exact) <= 1e-9 * exact
