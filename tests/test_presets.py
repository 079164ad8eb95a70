"""Presets: the paper's sizes and any input shape (their 1-Lipschitz invariant is in test_invariants.py)."""

from __future__ import annotations

import pytest
import torch

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
    # Parameters by the layer formulas: conv kernel (inner, C, 3, 3) + bias, dense (inner, C*64) + bias.
    expected = conv * (5 * channels * 9 + 5) + dense * (2048 * channels * 64 + 2048)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert abs(expected - params) / params < 0.02  # the paper's rounded figures


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 17, 23)])
def test_presets_build_for_any_input_shape(shape):
    for name in cpl_cert.PRESETS:
        with torch.device("meta"):
            model = cpl_cert.build_model(name, input_shape=shape, num_classes=10)
        assert model(torch.empty(2, *shape, device="meta")).shape == (2, 10)


def test_config_round_trip_and_validation():
    config = ModelConfig(input_shape=(3, 32, 32), num_classes=10, channels=16, conv_depth=2, dense_depth=1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CplCertError, match="unknown keys"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(CplCertError, match="truncation head"):
        ModelConfig(input_shape=(1, 4, 4), num_classes=10, channels=1, conv_depth=0, dense_depth=0)
    with pytest.raises(CplCertError, match="unknown preset"):
        cpl_cert.build_model("cpl-huge", input_shape=(1, 28, 28), num_classes=10)


SLL = {"sll-s": (20, 45, 7), "sll-m": (30, 60, 10), "sll-l": (50, 90, 10), "sll-xl": (70, 120, 15)}


@pytest.mark.parametrize("name", list(SLL))
def test_sll_presets_have_the_sll_codes_sizes(name):
    conv, channels, dense = SLL[name]
    with torch.device("meta"):
        model = cpl_cert.build_model(name, input_shape=(3, 32, 32), num_classes=10, head="lln")
    config = model.config
    assert (config.conv_depth, config.channels, config.dense_depth, config.layer) == (conv, channels, dense, "sll")
    assert (config.dense_inner, config.conv_inner, config.pool) == (2048, 5, 4)  # conv inner 5: its reproduce_tables.py
    # SLL layers add q (one per hidden unit) to the CPL layer's kernel and bias; the LLN head has K x F + K.
    expected = conv * (5 * channels * 9 + 2 * 5) + dense * (2048 * channels * 64 + 2 * 2048) + 10 * channels * 64 + 10
    assert sum(p.numel() for p in model.parameters()) == expected
    assert isinstance(model.dense[0], cpl_cert.SLLLinear) and isinstance(model.convs[0], cpl_cert.SLLConv2d)
