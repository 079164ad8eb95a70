"""Presets: the paper's sizes, any input shape, and 1-Lipschitz once frozen."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpl_cert
from cpl_cert.errors import CplCertError
from cpl_cert.models import ModelConfig

PAPER = {"cpl-s": (20, 45, 7, 41e6), "cpl-m": (30, 60, 10, 79e6), "cpl-l": (50, 90, 10, 118e6), "cpl-xl": (70, 120, 15, 236e6)}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_match_the_paper(name):
    conv, channels, dense, params = PAPER[name]
    with torch.device("meta"):
        model = cpl_cert.build_model(name, input_shape=(3, 32, 32), num_classes=10)
    config = model.config
    assert (config.conv_depth, config.channels, config.dense_depth) == (conv, channels, dense)
    assert (config.dense_inner, config.conv_inner, config.pool) == (2048, 5, 4)
    assert config.dense_width == channels * 64
    assert abs(cpl_cert.count_parameters(model) - params) / params < 0.02


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 17, 23)])
def test_presets_build_for_any_input_shape(shape):
    for name in cpl_cert.PRESETS:
        with torch.device("meta"):
            model = cpl_cert.build_model(name, input_shape=shape, num_classes=10)
        assert model(torch.empty(2, *shape, device="meta")).shape == (2, 10)


SMALL_SHAPE = (1, 8, 8)  # keeps the paper presets cheap on a CPU while exercising every layer


@pytest.fixture(scope="module")
def frozen_presets():
    models = {}
    for index, name in enumerate(cpl_cert.PRESETS):
        torch.manual_seed(index)
        model = cpl_cert.build_model(name, input_shape=SMALL_SHAPE, num_classes=3)
        with torch.no_grad():  # move away from initialisation so the test is not about init only
            for layer in model.modules():
                if isinstance(layer, (cpl_cert.CPLLinear, cpl_cert.CPLConv2d)):
                    layer.weight.mul_(1.0 + 3.0 * torch.rand(()))
        models[name] = cpl_cert.freeze(model, max_iters=200).double()
    return models


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(cpl_cert.PRESETS)), seed=st.integers(0, 2**31 - 1))
def test_frozen_presets_are_1_lipschitz_on_random_pairs(frozen_presets, name, seed):
    model = frozen_presets[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, *SMALL_SHAPE, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        gap = (model.features(x) - model.features(y)).norm(dim=1)
        logits_gap = (model(x) - model(y)).norm(dim=1)
    dist = (x - y).flatten(1).norm(dim=1)
    assert torch.all(gap <= dist * (1 + 1e-5))
    assert torch.all(logits_gap <= dist * (1 + 1e-5))


@pytest.mark.parametrize("name", sorted(cpl_cert.PRESETS))
def test_frozen_presets_jacobian_norm_at_most_one(frozen_presets, name):
    model = frozen_presets[name]
    x = torch.rand(1, *SMALL_SHAPE, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(model.features, x).reshape(-1, x.numel())
    assert torch.linalg.matrix_norm(jac, 2) <= 1 + 1e-5
    bounds = cpl_cert.lipschitz_bounds(model)
    assert bounds.upper == 1.0


def test_config_round_trip_and_validation():
    config = ModelConfig(input_shape=(3, 32, 32), num_classes=10, channels=16, conv_depth=2, dense_depth=1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CplCertError, match="unknown keys"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(CplCertError, match="truncation head"):
        ModelConfig(input_shape=(1, 4, 4), num_classes=10, channels=1, conv_depth=0, dense_depth=0)
    with pytest.raises(CplCertError, match="unknown preset"):
        cpl_cert.build_model("cpl-huge", input_shape=(1, 28, 28), num_classes=10)
