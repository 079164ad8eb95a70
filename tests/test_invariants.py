"""The last links of the soundness chain, checked exactly: every frozen step satisfies h ||W||^2 <= 2
with ||W|| from an SVD of the layer's explicit matrix, the step is rounded down, and the worst case
(every unit active) of every frozen layer is 1-Lipschitz. A step only 10 % too large fails here.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import all_active_jacobian_norm, exact_norm

import cpl_cert
from cpl_cert.freezing import freeze_layer, step_for_sigma
from cpl_cert.layers import STEP_EPSILON, CPLConv2d, CPLLinear


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (CPLConv2d, CPLLinear))]


def _assert_invariant(layer) -> None:
    h, s = float(layer.step), exact_norm(layer)
    assert h > 0 and Fraction(h) * Fraction(s) ** 2 <= 2 * (1 + Fraction(1, 10**12)), f"h s^2 = {h * s * s}"
    assert all_active_jacobian_norm(layer) <= 1 + 1e-12


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["conv", "dense"]),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-3, 6),
    size=st.integers(3, 7),
    iters=st.sampled_from([0, 1, 100]),
)
def test_every_frozen_layer_satisfies_the_exact_invariant(kind, seed, log_scale, size, iters):
    torch.manual_seed(seed)
    layer = CPLConv2d(3, 4, (size, size + 1)) if kind == "conv" else CPLLinear(size * 3, size * 2)
    with torch.no_grad():
        layer.weight.mul_(10.0**log_scale)
    freeze_layer(layer, max_iters=iters)
    _assert_invariant(layer)


@pytest.mark.parametrize("name", sorted(cpl_cert.PRESETS))
def test_every_preset_layer_satisfies_the_invariant_after_one_power_iteration(name):
    """All presets at a 4x4 input (every layer kind, real channel and inner sizes), frozen with a single
    power iteration from a random vector: the step must not depend on power iteration having converged."""
    torch.manual_seed(sorted(cpl_cert.PRESETS).index(name))
    model = cpl_cert.build_model(name, input_shape=(3, 4, 4), num_classes=3)
    with torch.no_grad():  # away from the initialisation
        for layer in _layers(model):
            layer.weight.mul_(1.0 + 3.0 * torch.rand(()))
    cpl_cert.freeze(model, max_iters=1)
    for layer in _layers(model):
        _assert_invariant(layer)
    assert cpl_cert.lipschitz_bounds(model).upper == 1.0


@settings(max_examples=300, deadline=None)
@given(sigma=st.floats(1e-6, 1e18))
def test_the_step_is_rounded_down_to_float32(sigma):
    step = step_for_sigma(sigma)
    exact = Fraction(2) / (Fraction(sigma) ** 2 + Fraction(STEP_EPSILON))
    assert Fraction(step) <= exact
    as_float32 = torch.tensor(step, dtype=torch.float32)
    assert float(as_float32) == step  # a float32 value, stored exactly in the checkpoint
    above = torch.nextafter(as_float32, torch.tensor(float("inf")))
    assert Fraction(float(above)) > exact  # and the largest such value
