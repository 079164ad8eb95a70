"""CPL layers and the 1-Lipschitz glue: exact Lipschitz behaviour, power iteration mechanics."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import conv_matrix, normalized_row_distances

import cpl_cert
from cpl_cert.freezing import freeze_layer
from cpl_cert.layers import BlockSumPool, ChannelPad, CPLConv2d, CPLLinear, LLNHead, TruncationHead

TOL = 1e-5


def _frozen_layer(kind: str, seed: int, scale: float = 1.0):
    torch.manual_seed(seed)
    layer = CPLConv2d(3, 4, (6, 5)) if kind == "conv" else CPLLinear(12, 7)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
    freeze_layer(layer)
    return layer.eval().double()


def _input_shape(kind: str):
    return (3, 6, 5) if kind == "conv" else (12,)


def _worst_pair(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A pair on which the layer (with a positive bias, so every unit is active between them) moves exactly as
    ``I - h W^T W`` along ``W``'s top right singular vector: ``(x, y, |1 - h s^2|)``, from the SVD of ``W``'s explicit
    float64 matrix (``references.conv_matrix``), not from cpl-cert's bounds."""
    matrix = conv_matrix(layer) if isinstance(layer, CPLConv2d) else layer.weight.detach().double()
    _, sigmas, vh = torch.linalg.svd(matrix)
    shape = (1, *layer.u.shape[1:])
    x = torch.zeros(shape, dtype=torch.float64)
    y = (0.5 / float(sigmas[0])) * vh[0].view(shape)  # |W y| <= 0.5 < bias: every unit active on [x, y]
    return x, y, abs(1.0 - float(layer.step) * float(sigmas[0]) ** 2)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["conv", "dense"]), seed=st.integers(0, 10_000), scale=st.floats(0.05, 20.0))
def test_frozen_layer_is_1_lipschitz_on_random_pairs(kind, seed, scale):
    """Random pairs, and the pair that attains the layer's worst case (the bias raised to 1, which the bound
    must survive: the step does not depend on it): ||f(x) - f(y)|| <= ||x - y||. The worst pair moves by
    exactly |1 - h s^2| (exact SVD), so a step above 2 / s^2 fails here."""
    layer = _frozen_layer(kind, seed, scale)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *_input_shape(kind), generator=g, dtype=torch.float64) * 3
    y = x + torch.randn(x.shape, generator=g, dtype=torch.float64) * torch.rand(64, *[1] * (x.dim() - 1), generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = (layer(x) - layer(y)).flatten(1).norm(dim=1)
        assert torch.all(out <= (x - y).flatten(1).norm(dim=1) * (1 + TOL))
        layer.bias.fill_(1.0)
        a, b, attained = _worst_pair(layer)
        ratio = float((layer(a) - layer(b)).norm() / (a - b).norm())
    assert ratio == pytest.approx(attained, rel=1e-9, abs=1e-12)  # the construction is the worst case
    assert ratio <= 1 + TOL


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["conv", "dense"]), seed=st.integers(0, 10_000), scale=st.floats(0.05, 20.0))
def test_frozen_layer_jacobian_norm_at_most_one(kind, seed, scale):
    layer = _frozen_layer(kind, seed, scale)
    x = torch.randn(1, *_input_shape(kind), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    assert torch.linalg.matrix_norm(jac, 2) <= 1 + TOL


def test_layer_formula_matches_definition():
    torch.manual_seed(0)
    layer = CPLLinear(6, 4)
    freeze_layer(layer)
    x = torch.randn(3, 6)
    h = layer.step
    expected = x - h * torch.relu(x @ layer.weight.t() + layer.bias) @ layer.weight
    assert torch.allclose(layer.eval()(x), expected, atol=1e-6)
    conv = CPLConv2d(2, 3, (5, 5))
    freeze_layer(conv)
    x = torch.randn(2, 2, 5, 5)
    hidden = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    expected = x - conv.step * torch.nn.functional.conv_transpose2d(hidden, conv.weight, padding=1)
    assert torch.allclose(conv.eval()(x), expected, atol=1e-6)


@pytest.mark.parametrize("layer", [CPLLinear(10, 6), CPLConv2d(3, 5, (8, 8))])
def test_training_step_updates_vector_in_place_and_gradient_flows_through_sigma(layer):
    layer.train()
    storage = layer.u.data_ptr()
    before = layer.u.clone()
    x = torch.randn(4, *layer.u.shape[1:])
    layer(x).pow(2).sum().backward()
    assert layer.u.data_ptr() == storage, "the vector must be updated in place (DDP keeps buffers by identity)"
    assert not torch.equal(layer.u, before)
    assert torch.isclose(layer.u.norm(), torch.tensor(1.0), atol=1e-5)
    grad_full = layer.weight.grad.clone()
    # the same loss with the step detached gives another gradient: sigma's gradient is part of it
    layer.weight.grad = None
    sigma = layer._sigma_estimate().detach()
    step = 2.0 / (sigma**2 + 1e-4)
    hidden = torch.relu(layer._apply_w(x, layer.weight) + layer._bias_view())
    (x - step * layer._apply_wt(hidden, layer.weight)).pow(2).sum().backward()
    assert not torch.allclose(grad_full, layer.weight.grad)


def test_power_iteration_in_training_converges_to_the_norm():
    torch.manual_seed(1)
    layer = CPLLinear(20, 15).train()
    for _ in range(300):
        layer(torch.zeros(1, 20))
    exact = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)
    assert math.isclose(float(layer._sigma_estimate().detach()), float(exact), rel_tol=1e-4)


def test_freeze_fixes_the_function_and_training_unfreezes():
    torch.manual_seed(2)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 12, 12), num_classes=4)
    cpl_cert.freeze(model)
    assert cpl_cert.is_frozen(model)
    x = torch.rand(5, 1, 12, 12)
    first = model(x)
    model.convs[0].u.copy_(torch.randn_like(model.convs[0].u))  # inference must not depend on the vector
    assert torch.equal(first, model(x))
    model.train()(x)
    assert not cpl_cert.is_frozen(model)


def test_glue_layers_are_1_lipschitz_and_heads_pair_constants():
    x, y = torch.randn(10, 3, 9, 9), torch.randn(10, 3, 9, 9)
    pad = ChannelPad(3, 7)
    assert torch.allclose(pad(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    pool = BlockSumPool(4)
    assert torch.all((pool(x) - pool(y)).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) * (1 + 1e-6))
    ones = torch.ones(1, 1, 4, 4)  # the worst case: a constant block, ||sum/4|| = ||block||
    assert torch.isclose(pool(ones).norm(), ones.norm())
    trunc = TruncationHead(3)
    assert torch.allclose(trunc.pair_lipschitz(), math.sqrt(2) * (1 - torch.eye(3, dtype=torch.float64)))
    lln = LLNHead(6, 3)
    truth, pairs = normalized_row_distances(lln.weight), lln.pair_lipschitz().tolist()  # one-sided: at or above the 60-digit truth
    assert all(truth[i][j] <= Decimal(pairs[i][j]) <= truth[i][j] * Decimal(1 + 1e-9) for i in range(3) for j in range(3))
    f = torch.randn(8, 6)
    g = torch.randn(8, 6)
    diff = (lln(f)[:, 0] - lln(f)[:, 2]) - (lln(g)[:, 0] - lln(g)[:, 2])
    assert torch.all(diff.abs() <= lln.pair_lipschitz()[0, 2] * (f - g).norm(dim=1) * (1 + 1e-5))
