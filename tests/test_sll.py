"""SLL layers against independent references: the definition in plain float64 ops, explicit operator matrices,
exact Jacobian norms, constructions where the rescaling is tight, and float64 re-computation of the float32 layer.

Nothing here computes t, ||diag(sqrt t) W|| or a rounding bound with cpl-cert's own code except the code under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from references import conv_matrix
from safetensors import safe_open
from safetensors.torch import save_file

import cpl_cert
from cpl_cert.errors import CplCertError
from cpl_cert.layers import SLLConv2d, SLLLinear
from cpl_cert.lipschitz import stage_bound as layer_row
from cpl_cert.models import ModelConfig
from cpl_cert.numerics import FLOAT32, norm_upper
from cpl_cert.rounding import sll_constants, sll_hidden_norm, stage_error, step_product_error
from cpl_cert.sll import freeze_sll_layer

U32 = 2.0**-24


# --- independent references ---------------------------------------------------------------------------------
def cross_reference(weight: torch.Tensor) -> torch.Tensor:
    """``sum over shifts |<K_i, K_j shifted>|`` by explicit loops (conv), ``|W W^T|`` (dense), float64."""
    w = weight.detach().double()
    if w.dim() == 2:
        return (w @ w.t()).abs()
    inner, _, k, _ = w.shape
    padded = F.pad(w, (k - 1, k - 1, k - 1, k - 1))
    total = torch.zeros(inner, inner, dtype=torch.float64)
    for dy in range(2 * k - 1):
        for dx in range(2 * k - 1):
            shifted = padded[:, :, dy : dy + k, dx : dx + k]  # K_j moved by (dy - k + 1, dx - k + 1)
            total += torch.einsum("acyx,bcyx->ab", w, shifted).abs()
    return total


def t_reference(layer: SLLConv2d | SLLLinear) -> torch.Tensor:
    """``t_i = 1 / sum_j C_ij q_j / q_i`` (0 where the sum is 0), q = exp(q_param), float64."""
    q = layer.q.detach().double().exp()
    sums = (cross_reference(layer.weight) * q[None, :] / q[:, None]).sum(dim=1)
    return torch.where(sums > 0, 1.0 / sums, torch.zeros_like(sums))


def scaled_matrix(layer: SLLConv2d | SLLLinear, t: torch.Tensor) -> torch.Tensor:
    """``A = diag(sqrt t) W`` as an explicit float64 matrix (rows of a conv: channel-major, then positions)."""
    if isinstance(layer, SLLConv2d):
        positions = layer.input_size[0] * layer.input_size[1]
        return conv_matrix(layer) * t.double().sqrt().repeat_interleave(positions)[:, None]
    return layer.weight.detach().double() * t.double().sqrt()[:, None]


def jacobian_norms(a: torch.Tensor, patterns: int, seed: int) -> float:
    """Largest ``||I - 2 A^T D A||`` over all-active, all-off and random 0/1 patterns D."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(a.shape[1], dtype=torch.float64)
    masks = [torch.ones(a.shape[0]), torch.zeros(a.shape[0])] + [(torch.rand(a.shape[0], generator=g) < 0.5).double() for _ in range(patterns)]
    return max(float(torch.linalg.matrix_norm(eye - 2 * a.t() @ (m.double()[:, None] * a), 2)) for m in masks)


def definition(layer: SLLConv2d | SLLLinear, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x - 2 W^T (t * relu(W x + b))`` in float64."""
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    x = x.double()
    if isinstance(layer, SLLConv2d):
        hidden = F.relu(F.conv2d(x, w, b, padding=1)) * t.double().view(1, -1, 1, 1)
        return x - 2 * F.conv_transpose2d(hidden, w, padding=1)
    return x - 2 * (F.relu(x @ w.t() + b) * t.double()) @ w


def make_layer(kind: str, seed: int, scale: float = 1.0) -> SLLConv2d | SLLLinear:
    torch.manual_seed(seed)
    layer = SLLConv2d(3, 4, (5, 6)) if kind == "conv" else SLLLinear(12, 7)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
    return layer.eval()


def input_shape(layer: SLLConv2d | SLLLinear) -> tuple[int, ...]:
    return (layer.channels, *layer.input_size) if isinstance(layer, SLLConv2d) else (layer.features,)


# --- the layer ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_forward_matches_the_definition_unfrozen_and_frozen(kind):
    layer = make_layer(kind, 1)
    x = torch.randn(5, *input_shape(layer))
    assert torch.allclose(layer.current_t().double(), t_reference(layer), rtol=1e-5)
    assert torch.allclose(layer(x).double(), definition(layer, x, t_reference(layer)), atol=1e-5)
    freeze_sll_layer(layer)
    assert layer.frozen and layer.t.dtype == torch.float32
    assert bool((layer.t.double() <= t_reference(layer) * (1 + 1e-12)).all())  # rounded down, never up
    assert torch.allclose(layer.t.double(), t_reference(layer), rtol=1e-6)
    assert torch.allclose(layer(x).double(), definition(layer, x, layer.t), atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_training_forward_equals_eval_and_the_gradient_reaches_q(kind):
    layer = make_layer(kind, 2)
    x = torch.randn(3, *input_shape(layer))
    expected = layer.eval()(x).detach()
    out = layer.train()(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.pow(2).sum().backward()
    assert layer.q.grad is not None and float(layer.q.grad.abs().max()) > 0  # through t
    assert not layer.frozen


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["conv", "dense"]), seed=st.integers(0, 10_000), scale=st.floats(0.05, 20.0),
       t_factor=st.sampled_from([None, 0.5, 1.3, 3.0]))
def test_certified_bound_is_above_exact_jacobian_norms(kind, seed, scale, t_factor):
    layer = make_layer(kind, seed, scale)
    freeze_sll_layer(layer, max_iters=0)
    if t_factor is not None:  # a rescaling the formula did not choose: the bound must follow it
        layer.set_frozen_t(layer.t * t_factor)
    row = layer_row("layer", layer)
    a = scaled_matrix(layer, layer.t)
    exact = float(torch.linalg.matrix_norm(a, 2))
    assert exact <= row.sigma_upper <= exact * (1.25 if kind == "conv" else 1 + 1e-7)  # FFT bound: loose at 5x6
    assert row.sigma_power <= exact * (1 + 1e-9)
    assert jacobian_norms(a, 6, seed) <= row.bound * (1 + 1e-12)  # the reference's own float64 rounding
    if t_factor is None:
        assert row.bound == 1.0


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_autograd_jacobian_is_the_explicit_one(kind):
    layer = make_layer(kind, 3).double()
    freeze_sll_layer(layer)
    x = torch.randn(1, *input_shape(layer), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    a = scaled_matrix(layer, layer.t)
    with torch.no_grad():
        active = ((layer._apply_w(x, layer.weight) + layer._bias_view()) > 0).flatten().double()
    assert torch.allclose(jac, torch.eye(x.numel(), dtype=torch.float64) - 2 * a.t() @ (active[:, None] * a), atol=1e-12)


def tight_layer(kind: str) -> SLLConv2d | SLLLinear:
    """A layer whose rows (dense) or centre taps (conv, other taps zero) are rows of a Hadamard matrix times
    powers of two: exactly orthogonal in float32, so ``|W W^T|`` is diagonal, ``t_i = 1 / ||w_i||^2`` is a float32
    number and ``||A|| = 1`` exactly. The all-active Jacobian then has eigenvalue -1 (the bound 1 is attained),
    and a certified bound of ``||A||`` is at least 1: freezing must shrink ``t`` to prove the layer bound 1."""
    hadamard = torch.ones(1, 1)
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    rows = hadamard[:4] * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None]
    if kind == "conv":
        layer: SLLConv2d | SLLLinear = SLLConv2d(8, 4, (4, 4))
        with torch.no_grad():
            layer.weight.zero_()
            layer.weight[:, :, 1, 1] = rows
    else:
        layer = SLLLinear(8, 4)
        with torch.no_grad():
            layer.weight.copy_(rows)
    return layer.eval()


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_tight_rescaling_freezes_to_bound_one_and_t_times_1_01_is_caught(kind):
    layer = tight_layer(kind)
    freeze_sll_layer(layer)
    assert bool((layer.t.double() < t_reference(layer)).all())  # shrunk below the exact 1 / ||w_i||^2
    a = scaled_matrix(layer, layer.t)
    assert 1 - 1e-6 < float(torch.linalg.matrix_norm(a, 2)) < 1.0  # tight, and the frozen t keeps it below 1
    assert layer_row("layer", layer).bound == 1.0
    assert jacobian_norms(a, 0, 0) == pytest.approx(1.0, abs=1e-6)  # all active: eigenvalue 1 - 2 ||A||^2 = -1
    layer.set_frozen_t(layer.t * 1.01)
    exact = jacobian_norms(scaled_matrix(layer, layer.t), 0, 0)
    assert exact == pytest.approx(1.02, abs=1e-6)
    assert exact <= layer_row("layer", layer).bound <= exact * 1.0001


def test_a_network_with_t_scaled_after_freezing_gets_a_bound_above_one():
    model = cpl_cert.build_model({"channels": 8, "conv_depth": 0, "dense_depth": 1, "dense_inner": 4, "pool": 4, "layer": "sll"},
                                 input_shape=(8, 4, 4), num_classes=3)
    model.dense[0] = tight_layer("dense")
    cpl_cert.freeze(model)
    assert cpl_cert.lipschitz_bounds(model).body_upper == 1.0
    model.dense[0].set_frozen_t(model.dense[0].t * 1.01)
    assert cpl_cert.lipschitz_bounds(model).body_upper >= 1.02 - 1e-6


def test_zero_rows_get_a_harmless_t_and_the_layer_stays_frozen():
    layer = SLLLinear(5, 3)
    with torch.no_grad():
        layer.weight.zero_()
    freeze_sll_layer(layer)
    assert layer.frozen and torch.equal(layer.t, torch.ones(3))
    x = torch.randn(4, 5)
    assert torch.equal(layer(x), x)


# --- models and checkpoints ---------------------------------------------------------------------------------
def test_sll_model_checkpoint_round_trip_and_cpl_configs_without_the_field(tmp_path):
    torch.manual_seed(5)
    model = cpl_cert.freeze(cpl_cert.build_model("sll-xs", input_shape=(1, 12, 12), num_classes=4, head="lln"))
    path = tmp_path / "sll.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset={"name": "x", "input_shape": [1, 12, 12], "num_classes": 4})
    loaded, meta = cpl_cert.load_checkpoint(path)
    assert meta["config"]["layer"] == "sll" and isinstance(loaded.dense[0], SLLLinear)
    x = torch.rand(3, 1, 12, 12)
    assert torch.equal(loaded(x), model(x))
    assert cpl_cert.lipschitz_bounds(loaded).body_upper == 1.0
    cpl = cpl_cert.build_model("cpl-tiny", input_shape=(1, 12, 12), num_classes=4).config
    assert "layer" not in json.loads(cpl.to_json())  # a CPL config reads as before the field existed
    assert ModelConfig.from_dict(json.loads(cpl.to_json())).layer == "cpl"
    with pytest.raises(CplCertError, match="layer must be one of"):
        ModelConfig.from_dict({**cpl.to_dict(), "layer": "aol"})


def test_an_edited_negative_t_is_refused(tmp_path):
    torch.manual_seed(6)
    model = cpl_cert.freeze(cpl_cert.build_model("sll-xs", input_shape=(1, 8, 8), num_classes=3))
    path = tmp_path / "sll.safetensors"
    cpl_cert.save_checkpoint(model, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["dense.0.t"][0] = -1.0
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=metadata)
    with pytest.raises(CplCertError, match="dense.0.t"):
        cpl_cert.load_checkpoint(tmp_path / "edited.safetensors")


# --- rounding -------------------------------------------------------------------------------------------------
def float32_error_and_bounds(layer: SLLConv2d | SLLLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: ``||float32 layer - exact layer||`` at the float32 input (float64 re-computation), the bound with
    the measured scaled hidden norm, and the bound from the input norm alone."""
    row = layer_row("layer", layer)
    c = sll_constants(row, layer)
    with torch.no_grad():
        hidden, step = layer.hidden(x), layer.current_step()
        z32 = layer.update(x, hidden, step)
        exact = definition(layer, x, layer.t)
    error = (z32.double() - exact).flatten(1).norm(dim=1)
    a = norm_upper(x)
    return error, stage_error(c, a, sll_hidden_norm(hidden, step), FLOAT32), stage_error(c, a, None, FLOAT32)


@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.parametrize("bias", [0.0, 1.0, 50.0])
def test_float32_layer_error_stays_under_the_bound_on_many_inputs(kind, bias):
    layer = make_layer(kind, 7, scale=3.0)
    with torch.no_grad():
        layer.bias.add_(bias)
    freeze_sll_layer(layer)
    g = torch.Generator().manual_seed(8)
    shape = input_shape(layer)
    x = torch.randn(400, *shape, generator=g) * torch.logspace(-3, 3, 400).view(-1, *[1] * len(shape))
    x = torch.cat([x, x[:40] * 1e-37])  # values near and below the smallest normal: the underflow allowance
    error, bound, coarse = float32_error_and_bounds(layer, x)
    assert bool((error <= bound).all()) and bool((bound <= coarse * (1 + 1e-4)).all())  # measuring costs at most its own allowance
    assert float((error / bound).max()) > 1e-3  # the bound is a worst case, not a blind constant


def test_the_product_term_is_nearly_attained():
    """``s = r = 1 + 2^-12``: ``s r = 1 + 2^-11 + 2^-24`` is a tie, rounded to even, an error of exactly ``2^-24`` per
    unit, about ``u s r``. With ``W = I`` nothing else rounds before it, so ``W^T`` of the product's error is the
    whole error vector: the term must bound it, and half of it must not."""
    n = 8
    layer = SLLLinear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    s = 1.0 + 2.0**-12
    layer.set_frozen_t(torch.full((n,), s / 2))
    x = torch.full((3, n), s)
    hidden, step = layer.hidden(x), layer.current_step()
    product = step * hidden
    actual = ((product.double() - s * s) @ layer.weight.double()).norm(dim=1)
    assert torch.allclose(actual, torch.full((3,), 2.0**-24 * math.sqrt(n), dtype=torch.float64))
    row = layer_row("layer", layer)
    term = step_product_error(sll_constants(row, layer), sll_hidden_norm(hidden, step), U32)
    assert bool((actual <= term).all())
    assert bool((actual > 0.99 * term).all())  # so a halved (or dropped) term fails
