"""certify(): agreement with an independent float64 computation, soundness against PGD, exact geometry."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_frozen
from references import exact_norm

import cpl_cert
from cpl_cert.data import load_dataset
from cpl_cert.errors import CplCertError
from cpl_cert.layers import CPLConv2d, CPLLinear

TINY = dict(channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32, pool=4)
REAL_ATTACK_FRACTION = 0.25  # measured: PGD closes a median 42 % of the margin here, a random start ~0 %


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist").subset(300)


def exact_conv_norm(layer: CPLConv2d) -> float:
    """||W||_2 of the zero-padded convolution, from its explicit matrix (tiny inputs only)."""
    c, (h, w) = layer.channels, layer.input_size
    basis = torch.eye(c * h * w, dtype=torch.float64).view(-1, c, h, w)
    matrix = F.conv2d(basis, layer.weight.detach().double(), padding=layer.padding).flatten(1)
    return float(torch.linalg.matrix_norm(matrix, ord=2))


def explicit_body_bound(model: cpl_cert.CPLNet) -> float:
    """Product of max(1, h s^2 - 1) with exact spectral norms, and 1 / min(std): written independently of lipschitz.py."""
    bound = 1.0 / float(model.normalize.std.min())
    for layer in model.modules():
        if isinstance(layer, CPLLinear):
            s = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
        elif isinstance(layer, CPLConv2d):
            s = exact_conv_norm(layer)
        else:
            continue
        bound *= max(1.0, float(layer.step) * s * s - 1.0)
    return bound


def per_sample_float64(model, images, labels, head: str) -> tuple[list[float], list[bool]]:
    """Radius and correctness of each sample, one at a time, with a float64 copy of the model."""
    exact = copy.deepcopy(model).double().eval()
    body = explicit_body_bound(model)
    radii, correct = [], []
    with torch.no_grad():
        if head == "lln":
            w = F.normalize(model.head.weight.detach().double(), dim=1)
        for x, y in zip(images, labels, strict=True):
            logits = exact(x[None].double() / 255.0)[0]
            top = int(logits.argmax())
            best = math.inf
            for j in range(logits.numel()):
                if j == top:
                    continue
                pair = math.sqrt(2.0) if head == "truncation" else float((w[top] - w[j]).norm())
                best = min(best, float(logits[top] - logits[j]) / (pair * body))
            radii.append(best)
            correct.append(top == int(y))
    return radii, correct


@pytest.mark.parametrize("head", ["truncation", "lln"])
def test_certified_accuracy_matches_independent_float64(fashion, head):
    # 12x12 centre crops keep the explicit conv matrix small (576 x 576).
    model = make_frozen("cpl-tiny", input_shape=(1, 12, 12), seed=3, head=head, **TINY)
    images = fashion.images[:120, :, 8:20, 8:20].contiguous()
    # Half of the labels are the model's own predictions, so that many points are correct.
    with torch.no_grad():
        own = model(images.float() / 255).argmax(1)
    labels = torch.where(torch.arange(120) % 2 == 0, own, fashion.labels[:120])
    radii, correct = per_sample_float64(model, images, labels, head)
    assert explicit_body_bound(model) == pytest.approx(cpl_cert.lipschitz_bounds(model).body_upper, rel=1e-9)
    good = sorted(r for r, c in zip(radii, correct, strict=True) if c)
    # Eps values a hair (1e-9 relative: far below float32 resolution) on either side of float64 radii of
    # correct points, so float32 radii alone would often be judged wrongly; the float64 re-check decides.
    eps = [good[len(good) // 4] * (1 - 1e-9), good[len(good) // 2] * (1 + 1e-9), good[-3] * (1 - 1e-9), 0.05]
    result = cpl_cert.certify(model, (images, labels), eps=eps, device="cpu", batch_size=32)
    assert result.n == 120
    assert result.rechecked >= 3
    for value, entry in zip(eps, result.certified, strict=True):
        expected = sum(c and r > value for r, c in zip(radii, correct, strict=True)) / 120
        assert entry["accuracy"] == expected
    assert result.clean_accuracy == sum(correct) / 120
    reference = torch.tensor(radii, dtype=torch.float64)
    assert bool((result.radii_exact <= reference * (1 + 1e-9)).all())  # lower bounds of the float64 radii...
    assert float((reference - result.radii_exact).max()) < 1e-3  # ...and close to them


def test_certify_sound_against_pgd(fashion):
    """PGD-L2 at 0.99 x radius (no box constraint: the certificate holds everywhere) never flips a prediction."""
    model = make_frozen("cpl-tiny", seed=1)
    images, labels = fashion.images[:200], fashion.labels[:200]
    result = cpl_cert.certify(model, (images, labels), eps=[0.1], device="cpu")
    x0 = images.float() / 255
    pred = torch.where(result.predictions >= 0, result.predictions, result.predictions_float32.clamp_min(0))  # radius 0 where -1
    eps = (0.99 * result.radii).float().view(-1, 1, 1, 1)
    delta = torch.randn_like(x0)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    steps = 20
    flipped = torch.zeros(200, dtype=torch.bool)
    worst_gap = torch.full((200,), math.inf)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x0 + delta)
        top = logits.gather(1, pred[:, None])[:, 0]
        other = logits.scatter(1, pred[:, None], -math.inf).max(1).values
        gap = top - other
        flipped |= (logits.argmax(1) != pred).detach()
        worst_gap = torch.minimum(worst_gap, gap.detach())
        (grad,) = torch.autograd.grad(gap.sum(), delta)
        with torch.no_grad():
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta - 2.5 * eps / steps * g
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
    with torch.no_grad():
        flipped |= model(x0 + delta).argmax(1) != pred
    assert not flipped.any(), f"PGD inside the certified radius changed {int(flipped.sum())} predictions"
    # The attack is real: a first-order step of length r along the gradient of the gap would close at
    # least ||grad|| * r of it; PGD must achieve most of that on the typical point.
    closed = (result.margins.float() - worst_gap) / result.margins.float()
    assert float(closed.median()) > REAL_ATTACK_FRACTION


def _rand_inputs(n: int, shape, seed: int) -> torch.Tensor:
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def test_radius_is_exact_distance_to_boundary_truncation():
    """0 CPL layers, pool 1, truncation head: f(x) = (x - mean)[:K], so the boundary is known in closed form."""
    model = make_frozen("cpl-tiny", input_shape=(1, 3, 3), num_classes=4, channels=1, conv_depth=0, dense_depth=0, pool=1, mean=(0.25,))
    x = _rand_inputs(50, (1, 3, 3), 0)
    result = cpl_cert.certify(model, (x, torch.zeros(50, dtype=torch.long)), eps=[0.1], device="cpu")
    flat = x.double().flatten(1)[:, :4]
    values, order = flat.sort(dim=1, descending=True)
    true_distance = (values[:, 0] - values[:, 1]) / math.sqrt(2.0)  # distance to the hyperplane x_top = x_second
    assert bool((result.radii <= true_distance).all())
    assert float((true_distance - result.radii).max()) < 1e-5
    # Moving just past the true distance along (e_second - e_top) / sqrt 2 reaches the boundary.
    direction = torch.zeros(50, 9, dtype=torch.float64)
    direction.scatter_(1, order[:, 1:2], 1 / math.sqrt(2.0))
    direction.scatter_(1, order[:, 0:1], -1 / math.sqrt(2.0))
    moved = x.double().flatten(1) + direction * (true_distance[:, None] * (1 + 1e-6) + 1e-9)
    logits = model.double()(moved.view(50, 1, 3, 3))
    assert bool((logits.gather(1, order[:, 1:2]) >= logits.gather(1, order[:, 0:1])).all())


def test_radius_is_exact_distance_to_boundary_lln():
    """0 CPL layers and an LLN head: f = W_n x + b, the boundary distance is min_j gap_j / ||w_t - w_j||."""
    model = make_frozen("cpl-tiny", input_shape=(1, 4, 4), num_classes=5, channels=1, conv_depth=0, dense_depth=0, pool=1, head="lln", seed=7)
    with torch.no_grad():
        model.head.bias.copy_(torch.randn(5, generator=torch.Generator().manual_seed(1)) * 0.1)
    x = _rand_inputs(40, (1, 4, 4), 2)
    result = cpl_cert.certify(model, (x, torch.zeros(40, dtype=torch.long)), eps=[0.1], device="cpu")
    w = F.normalize(model.head.weight.detach().double(), dim=1)
    logits = x.double().flatten(1) @ w.t() + model.head.bias.detach().double()
    top = logits.argmax(1)
    exact = copy.deepcopy(model).double()
    for i in range(40):
        t = int(top[i])
        distances = [float(logits[i, t] - logits[i, j]) / float((w[t] - w[j]).norm()) for j in range(5) if j != t]
        assert 0 <= min(distances) - float(result.radii[i]) < 1e-5
        # and the closest point of that boundary is really reached at that distance
        j = min((j for j in range(5) if j != t), key=lambda j: float(logits[i, t] - logits[i, j]) / float((w[t] - w[j]).norm()))
        direction = (w[j] - w[t]) / (w[j] - w[t]).norm()
        moved = x[i].double().flatten() + direction * min(distances) * (1 + 1e-6)
        with torch.no_grad():
            out = exact(moved.view(1, 1, 4, 4))[0]
        assert float(out[j]) >= float(out[t])


def test_certify_unfrozen_model_and_result_fields(fashion):
    """An unfrozen model (steps from its current power-iteration estimates, so its layers are not 1-Lipschitz) is
    certified as the function it computes, without being frozen or changed: predictions and clean accuracy are a
    float64 evaluation's, and no radius exceeds margin / (sqrt(2) L) for L the product of the layers' exact
    worst cases max(1, h s^2 - 1) (s from an SVD of each layer's explicit matrix); the radii are within 10 %
    of it on the points far from the boundary. The result's fields are consistent with each other."""
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, **{**TINY, "channels": 1, "conv_inner": 2}).eval()
    layers = cpl_cert.models.cpl_layers(model)
    state = copy.deepcopy(model.state_dict())
    calls = []
    result = cpl_cert.certify(model, fashion.subset(50), eps="0.05", device="cpu", batch_size=16, on_progress=lambda *call: calls.append(call))
    assert [(d, t) for stage, d, t in calls if stage == "float32"] == [(0, 50), (16, 50), (32, 50), (48, 50), (50, 50)]
    assert not any(layer.frozen for _, layer in layers) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    steps = [float(layer.current_step()) for _, layer in layers]
    exact = math.prod(max(1.0, abs(1.0 - h * exact_norm(layer) ** 2)) for h, (_, layer) in zip(steps, layers, strict=True))
    assert exact > 1.5  # the estimates are not converged: the network is far from 1-Lipschitz
    with torch.no_grad():
        logits = cpl_cert.models.float64_copy(model)(fashion.images[:50].double() / 255)
    top2 = logits.topk(2, dim=1)
    predictions = top2.indices[:, 0]
    assert torch.equal(result.predictions, predictions) and result.clean_accuracy == float((predictions == fashion.labels[:50]).double().mean())
    reference = (top2.values[:, 0] - top2.values[:, 1]) / (math.sqrt(2) * exact)
    assert bool((result.radii_exact <= reference * (1 + 1e-9)).all())
    far = reference > 0.01
    assert int(far.sum()) >= 25 and bool((result.radii_exact[far] >= 0.9 * reference[far]).all())
    assert result.certified_accuracy(0.05) == float((result.correct & (result.radii_exact > 0.05)).double().mean()) == result.certified[0]["accuracy"]
    assert result.predictions.dtype == torch.long and result.radii.dtype == torch.float64 and result.n == 50
    assert result.device == "cpu" and result.seconds > 0 and bool((result.radii <= result.radii_exact).all())
    with pytest.raises(CplCertError):
        cpl_cert.certify(model, (fashion.images[:4, :, :10], fashion.labels[:4]), device="cpu")
    with pytest.raises(CplCertError):
        cpl_cert.certify(model, fashion.subset(4), device="cpu", batch_size=0)
