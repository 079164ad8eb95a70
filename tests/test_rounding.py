"""The rounding bounds of cpl_cert.rounding (docs/math.md section 6), term by term, against constructions that
attain them: one-unit dense layers whose exact output is computed in rational arithmetic. Each bound must
hold, and be nearly attained, so that dropping or halving the term under test makes the test fail.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import make_frozen

import cpl_cert
from cpl_cert.certification import certificate_constants
from cpl_cert.models import float64_copy
from cpl_cert.numerics import FLOAT32, FLOAT32_ACC64, FLOAT32_BY_TAPS, FLOAT64, norm_upper
from cpl_cert.passes import accumulated_features, trace_body
from cpl_cert.rounding import StageConstants, ball_body_error, hidden_error, stage_error, stage_peak

U = 2.0**-24


def one_unit_layer(weight: float, bias: float, step: float, features: int = 1) -> cpl_cert.CPLNet:
    """Mean 0, std 1, no convolution, pool 1, one dense CPL layer with one hidden unit: the body is exactly
    ``z = x - h w relu(w . x + b)`` (every other stage is exact on these inputs)."""
    model = make_frozen("cpl-tiny", input_shape=(features, 1, 1), num_classes=2, channels=features, conv_depth=0, dense_depth=1,
                        dense_inner=1, pool=1, head="lln", mean=(0.0,) * features)
    with torch.no_grad():
        model.dense[0].weight.fill_(weight)
        model.dense[0].bias.fill_(bias)
    model.dense[0].set_frozen_step(step)
    return model.eval()


def dense_constants(model: cpl_cert.CPLNet):
    _, constants = certificate_constants(model)
    return next(c for c in constants.stages if c.kind == "cpl-dense")


def exact_output(model: cpl_cert.CPLNet, x: float) -> Fraction:
    layer = model.dense[0]
    w, b, h = (Fraction(float(t.detach())) for t in (layer.weight[0, 0], layer.bias[0], layer.step))
    return Fraction(x) - h * w * max(w * Fraction(x) + b, Fraction(0))


def measured_error(model: cpl_cert.CPLNet, x: float, accumulated: bool) -> float:
    """|computed z - exact z| for the float32 input ``x`` (cpl-cert's float32 network, or the plain float32 forward)."""
    point = torch.tensor([[[[x]]]], dtype=torch.float32)
    with torch.no_grad():
        z = accumulated_features(model, float64_copy(model), point) if accumulated else model.features(point)
    return float(abs(Fraction(float(z[0, 0])) - exact_output(model, x)))


def layer_bound(model: cpl_cert.CPLNet, x: float, arithmetic) -> float:
    c = dense_constants(model)
    return float(stage_error(c, norm_upper(torch.tensor([[x]])), None, arithmetic)[0])


# --- cpl-cert's float32 network (float64 accumulation) ----------------------------------------------------------
def test_the_final_rounding_of_an_accumulated_update_is_attained():
    """w = -1, x = 1, b = 2: the hidden unit is exactly 1, and z = 1 + h lands just below the midpoint between
    1 and the next float32, so the one rounding of the update costs almost u: the update term of the bound."""
    h = 2.0**-24 - 2.0**-40
    model = one_unit_layer(-1.0, 2.0, h)
    error, bound = measured_error(model, 1.0, True), layer_bound(model, 1.0, FLOAT32_ACC64)
    assert 0.99 * bound <= error <= bound  # the update term is ~u, the hidden units' term ~3 h u


def test_an_accumulated_hidden_rounding_carried_by_the_update_is_attained():
    """w = 2^-10, h w^2 = 1.875: the hidden unit's rounding (carried by h W^T, a factor 1920) and the update's
    rounding both land near their worst case in the same direction; the two terms of the bound are about
    equal, so halving either fails. (x and b found by a random search over float32 values.)"""
    x, b = float(torch.tensor(0.0026554439682513475)), float(torch.tensor(0.5338925719261169))
    model = one_unit_layer(2.0**-10, b, 1.875 * 2.0**20)
    error, bound = measured_error(model, x, True), layer_bound(model, x, FLOAT32_ACC64)
    assert 0.85 * bound <= error <= bound


# --- plain float32, any order ------------------------------------------------------------------------------------
def test_the_any_order_hidden_rounding_is_attained():
    """q = fl(fl(w x) + b): two roundings in the same direction, bounded by gamma_2 (|w x| + |b|) (the bias counts
    as a term of the sum, so a runtime that adds it inside the product is covered too); 89 % attained."""
    w, x, b = 1.3618570566177368, 1.4725428819656372, 0.10894740372896194
    model = one_unit_layer(w, b, 1e-3)
    wf, xf, bf = (float(torch.tensor(v)) for v in (w, x, b))
    with torch.no_grad():
        q = float(model.dense[0]._apply_w(torch.tensor([[xf]]), model.dense[0].weight)[0, 0] + model.dense[0].bias[0])
    error = float(abs(Fraction(q) - (Fraction(wf) * Fraction(xf) + Fraction(bf))))
    bound = float(hidden_error(dense_constants(model), torch.tensor([abs(xf)], dtype=torch.float64), FLOAT32)[0])
    assert 0.85 * bound <= error <= bound


def test_the_per_tap_hidden_rounding_is_attained_in_a_legal_order():
    """The first pass's convolutions summed per tap (``FLOAT32_BY_TAPS``): each tap's products in float32, the
    taps and the bias in float64, one rounding to float32. On a one-pixel image only the centre tap (2 channels)
    sees data: its two products and their sum all round down, then the bias lands the float64 sum just below a
    midpoint, so the final rounding adds almost u. Computed here in that order without fused multiply-adds (a
    legal order the bound must cover; BLAS may fuse and round less), the error reaches 87 % of ``hidden_error``,
    so halving the per-tap term fails. (w, x and b found by a random search over float32 values.)"""
    import numpy as np

    f32 = np.float32
    w1, w2, x1, x2, b = (f32(v) for v in (1.493829607963562, 0.4014371633529663, 1.3446602821350098, 0.3808039724826813,
                                          1.3469278314914845e-07))
    computed = f32(np.float64(f32(f32(w1 * x1) + f32(w2 * x2))) + np.float64(b))
    exact = Fraction(float(w1)) * Fraction(float(x1)) + Fraction(float(w2)) * Fraction(float(x2)) + Fraction(float(b))
    error = float(abs(Fraction(float(computed)) - exact))
    norm_w = math.hypot(float(w1), float(w2)) * (1 + 1e-15)  # ||W|| = || |W| || for the centre tap's one row
    c = StageConstants("conv", "cpl-conv", 1.0, width=2, step=1.0, sigma=norm_w, abs_sigma=norm_w, bias_norm=float(b),
                       terms_w=2 * 9, terms_wt=9, taps=9)
    bound = float(hidden_error(c, torch.tensor([math.hypot(float(x1), float(x2))], dtype=torch.float64), FLOAT32_BY_TAPS)[0])
    assert 0.85 * bound <= error <= bound


def test_plain_float32_errors_stay_under_their_bound_on_random_layers():
    """Random frozen networks: the plain float32 and the accumulated forward passes against float64, stage by
    stage, each within the bound that certify uses (measured norms of the pass itself)."""
    for seed, preset in enumerate(("cpl-tiny", "cpl-xs")):
        model = make_frozen(preset, input_shape=(1, 12, 12), num_classes=5, seed=seed, head="lln")
        _, constants = certificate_constants(model)
        x = torch.rand((64, 1, 12, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            features, trace = trace_body(model, x)
            exact = float64_copy(model).features(x.double())
            bound = sum(stage_error(c, trace.inputs[i], trace.hidden.get(i), FLOAT32) for i, c in enumerate(constants.stages) if c.measured)
        assert bool(((features.double() - exact).norm(dim=1) <= bound).all())


@pytest.mark.parametrize("preset", ["cpl-xs", "sll-xs"])
def test_both_float32_networks_stay_within_their_ball_bounds(preset):
    """What certify uses for the float32 certificates: from a float64 trace, the bound of each float32 network's
    feature error at the same point (a ball of radius 0), against the network actually run (CPL and SLL layers)."""
    model = make_frozen(preset, input_shape=(1, 12, 12), num_classes=5, seed=4, head="lln")
    _, constants = certificate_constants(model)
    model64 = float64_copy(model)
    x = torch.rand((64, 1, 12, 12), generator=torch.Generator().manual_seed(4)) * 3
    with torch.no_grad():
        exact, trace = trace_body(model64, x.double())
        zero = torch.zeros(64, dtype=torch.float64)
        for arithmetic, features in ((FLOAT32, model.features(x)), (FLOAT32_ACC64, accumulated_features(model, model64, x))):
            bound, _ = ball_body_error(constants, trace, constants.plan(FLOAT64), constants.plan(arithmetic), zero)
            error = (features.double() - exact).norm(dim=1)
            assert bool((error <= bound).all()) and float(error.max()) > 0, arithmetic.name


def test_stage_peaks_bound_every_value_computed():
    """``stage_peak`` (the overflow guard) bounds the magnitude of W x + b, of W^T r, of h W^T r and of the
    output at every layer of random networks (norms measured in float64)."""
    model = make_frozen("cpl-xs", input_shape=(1, 12, 12), num_classes=5, seed=3)
    model64 = float64_copy(model)
    _, constants = certificate_constants(model)
    x = torch.rand((32, 1, 12, 12), dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 4
    with torch.no_grad():
        for (name, stage), c in zip(model64.body(), constants.stages, strict=True):
            peak = stage_peak(c, x.flatten(1).norm(dim=1)) if c.measured else None
            if c.is_cpl:
                pre = stage._apply_w(x, stage.weight) + stage._bias_view()
                back = stage._apply_wt(torch.relu(pre), stage.weight)
                values = [pre, back, stage.step * back, stage(x)]
                largest = torch.stack([v.flatten(1).abs().amax(dim=1) for v in values]).amax(dim=0)
                assert bool((largest <= peak).all()), name
            x = stage(x)
    assert math.isfinite(float(constants.stages[-1].abs_sigma))
