"""Network bounds against independent references: exact operator norms, attained worst cases."""

from __future__ import annotations

import itertools
import math
from decimal import Decimal

import torch
from conftest import make_frozen
from references import all_active_jacobian_norm, exact_norm, normalized_row_distances

import cpl_cert
from cpl_cert.layers import CPLConv2d, CPLLinear


def _cpl(model):
    return [m for m in model.modules() if isinstance(m, (CPLConv2d, CPLLinear))]


def test_frozen_model_bound_is_one_and_above_lower_bound():
    model = make_frozen("cpl-tiny", input_shape=(1, 12, 12), num_classes=5)
    bounds = cpl_cert.lipschitz_bounds(model)
    assert bounds.upper == 1.0
    lower = cpl_cert.lipschitz_lower_bound(model, torch.rand(8, 1, 12, 12), iters=10)
    assert 0 < lower <= bounds.upper
    rows = [row for row in bounds.layers if row.kind.startswith("cpl")]
    for row, layer in zip(rows, _cpl(model), strict=True):
        exact = exact_norm(layer)
        assert exact <= row.sigma_upper <= exact * 1.05  # certified, and tight (FFT bound at 12x12)
        assert row.sigma_power <= exact * (1 + 1e-9)
        assert all_active_jacobian_norm(layer) <= 1 + 1e-12  # the worst case of the layer stays 1-Lipschitz


def test_weights_scaled_after_freezing_give_a_bound_above_one():
    model = make_frozen("cpl-tiny", input_shape=(1, 12, 12), num_classes=5)
    with torch.no_grad():
        for layer in _cpl(model):
            layer.weight.mul_(1.1)
    bounds = cpl_cert.lipschitz_bounds(model)
    exact = math.prod(max(1.0, float(layer.step) * exact_norm(layer) ** 2 - 1.0) for layer in _cpl(model))
    assert 1.2 < exact <= bounds.upper <= exact * 1.2  # the FFT bound is a few % loose at 12x12, x2.4 after h s^2 - 1
    worst = math.prod(all_active_jacobian_norm(layer) for layer in _cpl(model))  # attained per layer
    assert worst <= bounds.upper
    lower = cpl_cert.lipschitz_lower_bound(model, torch.rand(16, 1, 12, 12), iters=10)
    assert lower <= bounds.upper


def test_bound_is_attained_when_every_unit_is_active():
    """With a huge bias every ReLU is on, the Jacobian is I - h W^T W and its norm is h s^2 - 1 exactly."""
    torch.manual_seed(3)
    layer = CPLLinear(6, 4)
    with torch.no_grad():
        layer.bias.fill_(1e3)
    layer.set_frozen_step(3.0 / float(torch.linalg.matrix_norm(layer.weight.detach().double(), 2)) ** 2)  # h s^2 = 3
    model = cpl_cert.build_model({"channels": 1, "conv_depth": 0, "dense_depth": 1, "dense_inner": 4, "pool": 1},
                                 input_shape=(1, 2, 3), num_classes=2)
    model.dense[0] = layer
    model.head.num_classes = 6  # keep every coordinate so the network norm is the layer norm
    model.eval()
    bounds = cpl_cert.lipschitz_bounds(model)
    assert math.isclose(bounds.upper, 2.0, rel_tol=1e-5)
    lower = cpl_cert.lipschitz_lower_bound(model, torch.rand(4, 1, 2, 3), iters=200)
    assert math.isclose(lower, 2.0, rel_tol=1e-4)
    assert bounds.upper >= lower


def test_lower_bound_is_the_largest_exact_jacobian_norm_and_reports_progress():
    """Against the exact float64 Jacobian of each input (SVD): never above it, and converged to it; the progress
    callback hears every iteration (certify shows the time left of this stage)."""
    model = make_frozen("cpl-tiny", input_shape=(1, 6, 6), num_classes=4, channels=2, conv_inner=3, dense_inner=16, pool=1, seed=4)
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    exact_model = cpl_cert.models.float64_copy(model)
    exact = max(
        float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(exact_model, xi[None].double()).reshape(4, 36), 2))
        for xi in x
    )
    calls = []
    lower = cpl_cert.lipschitz_lower_bound(model, x, iters=60, on_progress=lambda *a: calls.append(a))
    assert exact * (1 - 1e-6) <= lower <= exact * (1 + 1e-12)
    assert calls[-1] == ("lower_bound", 60, 60) and len(calls) == 60


def test_std_normalisation_multiplies_the_bound():
    model = make_frozen("cpl-tiny", input_shape=(3, 8, 8), num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.2))
    assert math.isclose(cpl_cert.lipschitz_bounds(model).upper, 5.0, rel_tol=1e-6)


def test_lln_head_pairs_and_network_bound():
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=4, head="lln")
    bounds = cpl_cert.lipschitz_bounds(model)
    w = torch.nn.functional.normalize(model.head.weight.detach().double(), dim=1)
    svd = float(torch.linalg.svdvals(w)[0])
    assert svd <= bounds.upper <= svd * (1 + 1e-9)
    # One-sided against the true distances of the normalised rows (60 digits): a bound below them fails.
    assert bounds.body_upper == 1.0
    truth = normalized_row_distances(model.head.weight)
    pairs = bounds.pair_lipschitz().tolist()
    for i, j in itertools.product(range(4), repeat=2):
        assert Decimal(pairs[i][j]) >= truth[i][j], (i, j)
        assert Decimal(pairs[i][j]) <= truth[i][j] * Decimal(1 + 1e-9), (i, j)
