"""Regression tests for every way a wrong certificate got through (one test per case of the soundness review).

Each reference is independent of the code under test: exact rational arithmetic on networks whose
decision boundary has a closed form, float64 re-evaluation, explicit operator matrices.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_frozen
from references import all_active_jacobian_norm, pixel_batch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.certification import certificate_constants
from cpl_cert.cli import app
from cpl_cert.errors import CplCertError
from cpl_cert.layers import CPLLinear
from cpl_cert.models import float64_copy
from cpl_cert.numerics import FLOAT32, FLOAT64, norm_upper, strict_math
from cpl_cert.passes import accumulated_logits, trace_body
from cpl_cert.radii import as_points, fast_pass, float64_pass
from cpl_cert.rounding import body_error

NO_CPL = dict(channels=1, conv_depth=0, dense_depth=0)


# --- 1. an edited checkpoint -------------------------------------------------------------------------
def test_negative_std_in_an_edited_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    with safe_open(str(tiny_checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["normalize.std"] = -tensors["normalize.std"]
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    with pytest.raises(CplCertError, match="std"):
        cpl_cert.load_checkpoint(edited)
    result = CliRunner().invoke(app, ["certify", str(edited), "--limit", "10"])
    assert result.exit_code == 1
    assert "std" in result.output and "Traceback" not in result.output


def test_negative_std_in_memory_is_refused_by_certify():
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=3)
    with torch.no_grad():
        model.normalize.std.fill_(-1.0)
    with pytest.raises(CplCertError, match="std"):
        cpl_cert.certify(model, (pixel_batch(4, (1, 8, 8), 0), torch.zeros(4, dtype=torch.long)), device="cpu")
    with pytest.raises(CplCertError, match="std"):
        cpl_cert.lipschitz_bounds(model)


# --- 2. odd steps ------------------------------------------------------------------------------------------
def _single_dense_model(step_sign: float) -> cpl_cert.CPLNet:
    """A network whose only CPL layer has all units active (huge bias): its Jacobian is I - h W^T W."""
    model = make_frozen("cpl-tiny", input_shape=(1, 2, 3), num_classes=6, dense_depth=1, dense_inner=4, pool=1, channels=1, conv_depth=0)
    layer = model.dense[0]
    with torch.no_grad():
        layer.bias.fill_(1e3)
    layer.set_frozen_step(step_sign * float(layer.step))
    return model


def test_a_negative_step_gets_the_bound_one_plus_h_s_squared():
    model = _single_dense_model(-1.0)
    exact = all_active_jacobian_norm(model.dense[0])
    assert exact > 2.5  # 1 + |h| s^2 with h s^2 close to 2
    bound = cpl_cert.lipschitz_bounds(model).upper
    assert exact <= bound <= exact * (1 + 1e-9)
    with pytest.raises(CplCertError, match="negative"):
        cpl_cert.certify(model, (pixel_batch(2, (1, 2, 3), 1), torch.zeros(2, dtype=torch.long)), device="cpu")


def test_a_nan_step_has_no_bound():
    model = _single_dense_model(1.0)
    with pytest.raises(ValueError):
        model.dense[0].set_frozen_step(math.nan)
    with torch.no_grad():
        model.dense[0].step.fill_(math.nan)
    with pytest.raises(CplCertError):
        cpl_cert.lipschitz_bounds(model)


def test_freeze_of_huge_weights_stores_a_finite_sound_step():
    torch.manual_seed(0)
    layer = CPLLinear(12, 7)
    with torch.no_grad():
        layer.weight.mul_(1e20)
    cpl_cert.freeze(torch.nn.Sequential(layer))
    step = float(layer.step)
    assert math.isfinite(step) and step > 0
    s = float(torch.linalg.svdvals(layer.weight.detach().double())[0])
    assert step * s * s <= 2.0


# --- 3. per-sample radii on a model whose certificate is exact ----------------------------------------------
def test_no_radius_exceeds_the_true_distance_to_the_boundary():
    """Pool 2 + truncation head, no CPL layer: f_t - f_j = (S_t - S_j) / (2 * 255) for block sums S of
    the uint8 pixels, whose gradient has norm sqrt 2; the true radius is exactly gap / sqrt 2."""
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=10, pool=2, mean=(0.3,), **NO_CPL)
    images = pixel_batch(2000, (1, 8, 8), 3)
    result = cpl_cert.certify(model, (images, torch.zeros(2000, dtype=torch.long)), eps=[0.1], device="cpu")
    sums = images.long().view(2000, 4, 2, 4, 2).sum(dim=(2, 4)).flatten(1)[:, :10]  # (N, 10) block sums
    ordered = sums.sort(dim=1, descending=True).values
    for i in range(2000):
        gap = Fraction(int(ordered[i, 0] - ordered[i, 1]), 510)
        for name in ("radii", "radii_exact", "radii_float32"):
            r = Fraction(float(getattr(result, name)[i]))
            assert 2 * r * r <= gap * gap, f"{name}[{i}] = {float(r)} exceeds the true radius {float(gap) / math.sqrt(2)}"
        if gap == 0:
            assert int(result.predictions[i]) == -1
    true_radius = (ordered[:, 0] - ordered[:, 1]).double() / 510 / math.sqrt(2)
    assert float((true_radius - result.radii_exact).max()) < 1e-5  # and tight
    _float32_flips_outside(model, images.double() / 255, result, sums)


def _float32_flips_outside(model, clean: torch.Tensor, result, sums: torch.Tensor) -> None:
    """Walk towards the nearest boundary: cpl-cert's float32 network keeps its class inside ``radii_float32``
    and PyTorch's plain float32 forward (a correctly rounded runtime) inside ``radii_any``."""
    top2 = sums.topk(2, dim=1).indices
    side = int(math.isqrt(clean[0].numel()))
    blocks = torch.zeros(10, side * side, dtype=torch.float64)
    for b in range(10):
        row, col = divmod(b, side // 2)
        blocks[b].view(side, side)[2 * row : 2 * row + 2, 2 * col : 2 * col + 2] = 1.0
    direction = (blocks[top2[:, 1]] - blocks[top2[:, 0]]) / math.sqrt(8.0)
    model64 = float64_copy(model)
    networks = ((result.radii_float32, result.predictions_float32, lambda x: accumulated_logits(model, model64, x)),
                (result.radii_any, result.predictions_any, model))
    for radius, reference, network in networks:
        checked = 0
        for fraction in (1.0, 1 - 1e-8, 1 - 1e-7, 1 - 1e-6):
            moved = (clean.flatten(1) + direction * (radius.double() * fraction)[:, None]).float()
            distance = (moved.double() - clean.flatten(1)).norm(dim=1)
            inside = (distance * (1 + 1e-12) < radius) & (radius > 0)
            with torch.no_grad():
                flipped = network(moved.view(clean.shape)).argmax(dim=1) != reference
            assert not bool((inside & flipped).any())
            checked += int(inside.sum())
        assert checked > 1000


# --- 4. logits far from zero ------------------------------------------------------------------------------
def test_a_large_common_bias_offset_never_certifies_a_breakable_point():
    """LLN head, no CPL layer: f = W_n (x - m) + b, whose decision boundaries are hyperplanes. A common
    offset of 2^15 in b changes no exact prediction but leaves float32 logits 2^-9 apart."""
    model = make_frozen("cpl-tiny", input_shape=(1, 4, 4), num_classes=5, pool=1, head="lln", seed=7, mean=(0.5,), **NO_CPL)
    with torch.no_grad():
        model.head.bias.copy_(torch.randn(5, generator=torch.Generator().manual_seed(1)) * 0.05 + 2.0**15)
    images = pixel_batch(600, (1, 4, 4), 5)
    x = images.double().flatten(1) / 255
    w = F.normalize(model.head.weight.detach().double(), dim=1)
    b = model.head.bias.detach().double()
    logits = (x - 0.5) @ w.t() + b
    top = logits.argmax(dim=1)
    gaps = ((x - 0.5) @ w.t()).gather(1, top[:, None]) - (x - 0.5) @ w.t() + (b[top][:, None] - b[None, :])
    norms = (w[top][:, None, :] - w[None, :, :]).norm(dim=-1)
    truth = (gaps / norms).scatter(1, top[:, None], math.inf).min(dim=1).values
    labels = top.clone()
    picks = truth.sort().values[[100, 250, 400, 550]]
    eps = [float(v) * (1 + s) for v, s in zip(picks, (1e-7, -1e-7, 3e-7, -3e-7), strict=True)]
    result = cpl_cert.certify(model, (images, labels), eps=eps, device="cpu")
    assert bool((result.radii_exact <= truth * (1 + 1e-12)).all())
    assert bool((result.radii_float32 <= truth * (1 + 1e-12)).all())
    for entry, value in zip(result.certified, eps, strict=True):
        assert entry["accuracy"] == float((truth > value).double().mean())
    # the float32 network: walk straight to each point's nearest boundary
    nearest = (gaps / norms).scatter(1, top[:, None], math.inf).argmin(dim=1)
    direction = (w[nearest] - w[top]) / (w[nearest] - w[top]).norm(dim=1, keepdim=True)
    for fraction in (1.0, 0.999, 0.99, 0.9):
        moved = (x + direction * (result.radii_float32 * fraction)[:, None]).float()
        inside = (moved.double() - x).norm(dim=1) * (1 + 1e-12) < result.radii_float32
        with torch.no_grad():
            flipped = model(moved.view(-1, 1, 4, 4)).argmax(dim=1) != top
        assert not bool((inside & flipped).any())


# --- 5. non-finite float32 logits ---------------------------------------------------------------------------
def test_overflowing_float32_logits_are_decided_in_float64():
    model = make_frozen("cpl-tiny", input_shape=(1, 4, 4), num_classes=3, dense_depth=1, dense_inner=8, pool=1, seed=4, channels=1, conv_depth=0)
    with torch.no_grad():
        model.dense[0].weight.mul_(1e20)
    cpl_cert.freeze(model)
    images = pixel_batch(64, (1, 4, 4), 9)
    with torch.no_grad():
        float32 = model(images.float() / 255)
        exact = float64_logits(model, images)
    nonfinite = ~torch.isfinite(float32).all(dim=1)
    assert nonfinite.sum() > 10 and torch.isfinite(exact).all()
    result = cpl_cert.certify(model, (images, exact.argmax(dim=1)), eps=[1e-3], device="cpu")
    assert torch.equal(result.predictions, exact.argmax(dim=1))
    top2 = exact.topk(2, dim=1).values
    assert bool((result.radii_exact <= (top2[:, 0] - top2[:, 1]) / math.sqrt(2) * (1 + 1e-9)).all())
    # plain float32 overflows (W^T r ~ 1e40), so no float32 runtime is proven to give any class there ...
    assert bool((result.predictions_any[nonfinite] == -1).all() and (result.radii_any[nonfinite] == 0).all())
    # ... while cpl-cert's float32 network sums in float64, never overflows here, and predicts the exact class
    assert torch.equal(result.predictions_float32, exact.argmax(dim=1))
    assert bool((result.radii_float32 <= (top2[:, 0] - top2[:, 1]) / math.sqrt(2) * (1 + 1e-9)).all())
    assert result.nonfinite == 0  # float64 decided them all


def float64_logits(model: cpl_cert.CPLNet, images: torch.Tensor) -> torch.Tensor:
    from cpl_cert.models import float64_copy

    return float64_copy(model)(images.double() / 255)


# --- 6. reduced-precision math ---------------------------------------------------------------------------
def _precision_knobs() -> tuple:
    backends = torch.backends
    return (backends.cudnn.enabled, backends.cudnn.conv.fp32_precision, backends.cuda.matmul.fp32_precision,
            backends.mkldnn.conv.fp32_precision)


def test_certify_runs_with_full_precision_math_and_restores_the_settings():
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=3)
    seen = []
    model.convs[0].register_forward_pre_hook(lambda *_: seen.append(_precision_knobs()))
    before = _precision_knobs()
    cpl_cert.certify(model, (pixel_batch(8, (1, 8, 8), 2), torch.zeros(8, dtype=torch.long)), device="cpu")
    assert seen and all(knobs == (False, "ieee", "ieee", "ieee") for knobs in seen)
    assert _precision_knobs() == before
    with strict_math():
        assert _precision_knobs() == (False, "ieee", "ieee", "ieee")
    assert _precision_knobs() == before


# --- 7. unfrozen models ------------------------------------------------------------------------------------------
def test_unfrozen_models_certify_like_their_frozen_twin(fashion_600):
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10).eval()
    twin = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10)
    twin.load_state_dict(model.state_dict())
    for (_, layer), (_, copy) in zip(cpl_cert.models.cpl_layers(model), cpl_cert.models.cpl_layers(twin), strict=True):
        copy.set_frozen_step(float(layer.current_step()))
    twin.eval()
    first = cpl_cert.certify(twin, fashion_600, eps=[0.05], device="cpu")
    eps = [float(first.radii_exact[first.correct].median())]  # forces float64 re-evaluations
    a = cpl_cert.certify(model, fashion_600, eps=eps, device="cpu")
    b = cpl_cert.certify(twin, fashion_600, eps=eps, device="cpu")
    assert a.rechecked > 0
    for name in ("predictions", "predictions_float32", "radii", "radii_exact", "radii_float32"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    lower = cpl_cert.lipschitz_lower_bound(model, fashion_600.images[:4].float() / 255, iters=5)
    assert 0 < lower <= a.bounds.upper
    suite = cpl_cert.attacks.run_suite(model, fashion_600.images[:20].float() / 255, a.predictions[:20], [0.1], "minnorm", steps=10)
    assert suite.distance.shape == (1, 20)


# --- 8. ties, integer images -------------------------------------------------------------------------------
def test_an_exact_tie_is_an_error():
    model = make_frozen("cpl-tiny", input_shape=(1, 2, 2), num_classes=4, pool=1, **NO_CPL)
    images = torch.tensor([[[[100, 100], [50, 0]]], [[[100, 90], [50, 0]]]], dtype=torch.uint8)
    result = cpl_cert.certify(model, (images, torch.zeros(2, dtype=torch.long)), eps=[0.01], device="cpu")
    assert result.predictions.tolist() == [-1, 0]
    assert result.predictions_float32.tolist() == [-1, 0]
    assert result.clean_accuracy == 0.5 and result.clean_accuracy_float32 == 0.5
    assert float(result.radii[0]) == 0.0


def test_integer_images_other_than_uint8_are_refused():
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=3)
    images = pixel_batch(4, (1, 8, 8), 0).long()
    with pytest.raises(CplCertError, match="uint8"):
        cpl_cert.certify(model, (images, torch.zeros(4, dtype=torch.long)), device="cpu")


@pytest.fixture(scope="module")
def fashion_600():
    return cpl_cert.load_dataset("fashion-mnist").subset(600)



def inspecting_outputs(model, path) -> list[str]:
    """``model`` saved to ``path``, then what certify, lipschitz and info print (stdout and stderr); each exits 0."""
    cpl_cert.save_checkpoint(model, path, dataset={"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10})
    outputs = []
    for args in (["certify", str(path), "--limit", "20", "--lower-bound-samples", "0"], ["lipschitz", str(path), "--samples", "0"],
                 ["info", str(path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs.append(result.output + (result.stderr if result.stderr_bytes is not None else ""))
    return outputs


def test_a_checkpoint_above_one_lipschitz_is_named_by_certify_lipschitz_and_info(tmp_path):
    model = make_frozen("cpl-tiny", input_shape=(1, 28, 28), num_classes=10)
    with torch.no_grad():
        model.dense[0].weight.mul_(1.2)  # after freezing: the stored step no longer fits
    for output in inspecting_outputs(model, tmp_path / "scaled.safetensors"):
        assert "is not 1-Lipschitz" in output


def test_an_lln_head_above_one_is_not_named(tmp_path):
    """The promise is about the body: an LLN head's whole-map norm exceeds 1 by design (its rows have
    norm 1) and enters the certificates per class pair, so a model with a 1-Lipschitz body gets no warning."""
    model = make_frozen("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, head="lln")
    bounds = cpl_cert.lipschitz_bounds(model)
    assert bounds.upper > 1.0 >= bounds.body_upper
    for output in inspecting_outputs(model, tmp_path / "lln.safetensors"):
        assert "1-Lipschitz" not in output


def fast_pass_models():
    """fmnist-cpl-xs (its convolutions: oneDNN's), and a network of the paper's conv shape (4 outputs against
    16 channels: summed per tap)."""
    shipped, _ = cpl_cert.load_checkpoint(Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-xs.safetensors")
    paper_shape = make_frozen("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, channels=16, conv_inner=4, conv_depth=3, seed=2)
    return {"fmnist-cpl-xs": shipped, "by taps": paper_shape}


@pytest.mark.parametrize("name", ["fmnist-cpl-xs", "by taps"])
def test_the_fast_pass_encloses_the_float64_radius(fashion_600, name):
    """The first pass runs the convolutions in float32 (summed per tap where that pays) and the dense layers
    in float64; its interval must still count the convolutions' float32 rounding. The float64 evaluation
    throughout (an independent, far tighter enclosure of the same exact radius) must overlap it for every
    point. Float32 images make the inputs exact (no uint8 rounding in the interval), so with the
    convolutions' rounding left out the interval shrinks to about 1e-12 around a value that is off by the
    float32 error, and misses."""
    model = fast_pass_models()[name]
    _, constants = certificate_constants(model)
    assert any(a.by_taps for a in constants.plan(FLOAT32, FLOAT64, by_taps=True)) == (name == "by taps")
    images, labels = fashion_600.images[:200].float() / 255, fashion_600.labels[:200]
    with torch.inference_mode(), strict_math():
        model64 = float64_copy(model)
        fast = fast_pass(model, model64, constants, images, labels)
        exact = float64_pass(model64, constants, images, labels)
    same = (fast.top == exact.top) & (exact.low > 0)
    assert same.sum() > 150
    assert bool(((fast.low <= exact.high) & (exact.low <= fast.high))[same].all())
    assert bool((fast.radius32 <= exact.high)[same].all()) and bool((fast.radius_any <= fast.radius32)[same].all())


# --- 9. tiny and huge activations -------------------------------------------------------------------------
def test_norms_that_underflow_still_bound_the_true_norm():
    """A 1000-vector of 1e-23 measured 0 in float32 (its squares underflow), one of 1e-22 1 % low."""
    for value, dtype in ((1e-23, torch.float32), (1e-22, torch.float32), (1e-40, torch.float32), (1e-160, torch.float64)):
        x = torch.full((1, 1000), value, dtype=dtype)
        true = Fraction(float(x[0, 0])) ** 2 * 1000
        bound = Fraction(float(norm_upper(x)[0]))
        assert bound * bound >= true


def test_tiny_inputs_keep_every_radius_below_the_true_one():
    """Test 3's exact geometry (pool 2, truncation head, f_t - f_j = (S_t - S_j) / 2 for block sums S) on
    float inputs scaled by 1e-25: every radius below the true one, exact counts, and both float32 networks
    keeping their class inside their radii (norms of 1e-25-sized activations underflowed in float32)."""
    model = make_frozen("cpl-tiny", input_shape=(1, 8, 8), num_classes=10, pool=2, mean=(0.0,), **NO_CPL)
    images = pixel_batch(2000, (1, 8, 8), 3).float() / 255 * 1e-25
    blocks = images.double().view(2000, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2000, 16, 4)[:, :10]
    sums = [[sum(Fraction(float(v)) for v in block) for block in row] for row in blocks.tolist()]
    gaps = [sorted(row, reverse=True)[0] - sorted(row, reverse=True)[1] for row in sums]  # 2 (f_top - f_second)
    labels = torch.tensor([max(range(10), key=row.__getitem__) for row in sums])
    truth = torch.tensor([float(g) / 2 / math.sqrt(2) for g in gaps], dtype=torch.float64)
    picks = truth.sort().values[[100, 1000, 1900]]
    eps = [float(v) * (1 + d) for v, d in zip(picks, (1e-7, -1e-7, 3e-7), strict=True)]
    result = cpl_cert.certify(model, (images, labels), eps=eps, device="cpu")
    for name in ("radii", "radii_exact", "radii_float32", "radii_any"):
        radii = getattr(result, name)
        assert all(2 * Fraction(float(r)) ** 2 * 4 <= g * g for r, g in zip(radii.tolist(), gaps, strict=True)), name
    for entry, value in zip(result.certified, eps, strict=True):
        assert entry["accuracy"] == float(((truth > value) & torch.tensor([g > 0 for g in gaps])).double().mean())
    _float32_flips_outside(model, images.double(), result, torch.tensor([[float(v) for v in row] for row in sums]))


def test_a_network_at_1e_minus_25_scale_keeps_its_rounding_bound():
    """fmnist-cpl-best rewritten with mean 0, std 1e25 and biases / 1e25 computes the same function at 1e-25
    scale; the measured error of the first pass's features must stay under its bound at every point."""
    model, _ = cpl_cert.load_checkpoint(Path(__file__).resolve().parents[1] / "models" / "fmnist-cpl-best.safetensors")
    with torch.no_grad():
        model.normalize.mean.zero_()
        model.normalize.std.fill_(1e25)
        for _, layer in cpl_cert.models.cpl_layers(model):
            layer.bias.div_(1e25)
        model.head.bias.div_(1e25)
    _, constants = certificate_constants(model)
    images = cpl_cert.load_dataset("fashion-mnist").images[:300]
    with torch.inference_mode(), strict_math():
        model64 = float64_copy(model)
        x32, _ = as_points(images, torch.float32)
        features32, trace = trace_body(model, x32)
        bound = body_error(constants, trace, constants.plan(FLOAT32))
        exact = model64.features(x32.double())
    measured = (features32.double() - exact).norm(dim=1)
    assert bool((measured <= bound).all()) and float(measured.max()) > 0
