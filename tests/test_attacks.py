"""The attacks against closed-form minimal adversarial distances, and no violation on frozen CPL models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cpl_cert
from cpl_cert.attacks import (
    apgd_l2,
    apgd_targeted_l2,
    checkpoints,
    find_violations,
    fmn_l2,
    make_checker,
    pgd_l2,
    project,
    run_suite,
    verify_exact,
    verify_float32,
)
from cpl_cert.attacks.common import AttackOutcome
from cpl_cert.radii import exact_points


class Linear(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))


class Ring(nn.Module):
    """2-D toy: class 0 inside the circle of radius 0.25 around (0.5, 0.5), class 1 outside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = (x - 0.5).norm(dim=1)
        return torch.stack([0.25 - r, r - 0.25], dim=1)


def linear_case(n: int = 64, dim: int = 20, classes: int = 10):
    """Points well inside [0, 1] and their exact minimal l2 distance min_j (f_p - f_j) / ||w_p - w_j||."""
    torch.manual_seed(0)
    model = Linear(dim, classes)
    x = 0.5 + 0.02 * torch.randn(n, dim)
    with torch.no_grad():
        logits = model(x)
        pred = logits.argmax(1)
        w = model.layer.weight.double()
        gaps = logits.double().gather(1, pred[:, None]) - logits.double()
        ratio = gaps / (w[pred][:, None, :] - w[None]).norm(dim=2)
        ratio[torch.arange(n), pred] = math.inf
    exact = ratio.min(dim=1).values
    assert bool((exact < 0.3).all())  # the nearest boundary point stays inside the box
    return model, x, pred, exact


def ring_case(n: int = 64):
    g = torch.Generator().manual_seed(1)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    radius = 0.05 + 0.35 * torch.rand(n, generator=g)
    x = 0.5 + radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    model = Ring()
    return model, x, model(x).argmax(1), (radius - 0.25).abs().double()


CASES = {"linear": linear_case, "ring": ring_case}


def test_apgd_checkpoints_follow_croce_hein():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("case", CASES)
def test_minnorm_finds_the_exact_distance(case):
    model, x, pred, exact = CASES[case]()
    out = fmn_l2(model, x, pred)
    assert bool(out.found.all())
    relative = out.distance / exact - 1
    assert float(relative.abs().max()) < 1e-4  # observed: 1.2e-6 (linear), 1.7e-5 (ring)
    assert float(relative.min()) > -1e-5  # nothing can beat the true minimum (float32 rounding aside)


def test_minnorm_finds_points_next_to_the_boundary():
    """Points 1e-5 to 1e-4 from the boundary, whose clean margins (as many logits) straddle FMN's clearance (1e-5).

    Before the fix FMN hovered on the boundary and found none of them (2 of 200 Fashion-MNIST points on
    a dense CPL model, which FAB-T broke at 8e-5 and 2e-4).
    """
    model, x, pred, exact = linear_case()
    w = model.layer.weight.detach()
    with torch.no_grad():
        logits = model(x)
    gaps = (logits.gather(1, pred[:, None]) - logits) / (w[pred][:, None, :] - w[None]).norm(dim=2)
    nearest = gaps.scatter(1, pred[:, None], math.inf).argmin(dim=1)
    direction = torch.nn.functional.normalize(w[nearest] - w[pred], dim=1)
    target = torch.linspace(1e-5, 1e-4, x.shape[0])
    moved = x + direction * (exact.float() - target)[:, None]
    with torch.no_grad():
        logits = model(moved)
    assert bool((logits.argmax(1) == pred).all())
    assert float((logits.topk(2, dim=1).values @ torch.tensor([1.0, -1.0])).max()) < 2e-4  # margins near the clearance
    out = fmn_l2(model, moved, pred)
    assert bool(out.found.all())
    assert float((out.distance / target.double() - 1).abs().max()) < 0.05


@pytest.mark.parametrize("case", CASES)
def test_apgd_breaks_every_point_just_beyond_its_exact_distance(case):
    model, x, pred, exact = CASES[case]()
    g = torch.Generator().manual_seed(0)
    targeted = apgd_targeted_l2(model, x, pred, (exact * 1.01).float(), generator=g)
    untargeted = apgd_l2(model, x, pred, (exact * 1.01).float(), generator=g)
    broken = targeted.found | untargeted.found
    assert bool(broken.all())
    assert bool((targeted.distance[targeted.found] <= exact[targeted.found] * 1.01 + 1e-6).all())
    below = apgd_targeted_l2(model, x, pred, (exact * 0.99).float(), generator=g)
    assert not bool(below.found.any())


@pytest.mark.parametrize("case", CASES)
def test_targeted_apgd_is_at_least_as_strong_as_pgd(case):
    model, x, pred, exact = CASES[case]()
    eps = float(exact.median())
    pgd = pgd_l2(model, x, pred, eps, generator=torch.Generator().manual_seed(0))
    apgdt = apgd_targeted_l2(model, x, pred, eps, generator=torch.Generator().manual_seed(0))
    assert int(apgdt.found.sum()) >= int(pgd.found.sum())
    assert bool((apgdt.found | ~pgd.found).all())  # every point PGD breaks, APGD-T breaks too


def test_projection_respects_ball_and_box():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(32, 1, 8, 8, generator=g)
    x = x0 + 3 * torch.randn(32, 1, 8, 8, generator=g)
    p = project(x0, x, 0.5)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert bool(((p - x0).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all())


def test_verification_accepts_only_examples_that_really_change_the_class():
    """LLN head without CPL layers: f = W_n (x - m) + b, boundaries are hyperplanes with closed forms."""
    torch.manual_seed(5)
    model = cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(1, 4, 4), num_classes=5, channels=1, conv_depth=0,
                                                 dense_depth=0, pool=1, head="lln", mean=(0.5,)))
    x = (0.5 + 0.1 * torch.randn(16, 16, generator=torch.Generator().manual_seed(2))).double()
    w = torch.nn.functional.normalize(model.head.weight.detach().double(), dim=1)
    logits = (x - 0.5) @ w.t() + model.head.bias.detach().double()
    top = logits.argmax(1)
    distance = ((logits.gather(1, top[:, None]) - logits) / (w[top][:, None] - w[None]).norm(dim=2)).scatter(1, top[:, None], math.inf)
    truth, nearest = distance.min(dim=1)
    assert bool((truth > 1e-3).all())  # far enough from the boundary for a 1e-4 relative step in float32
    direction = (w[nearest] - w[top]) / (w[nearest] - w[top]).norm(dim=1, keepdim=True)
    checker = make_checker(model)
    found = torch.ones(16, dtype=torch.bool)
    for factor, real in ((1 + 1e-4, True), (1 - 1e-4, False), (0.0, False)):
        candidate = (x + direction * (truth * factor)[:, None]).float().view(16, 1, 4, 4)
        outcome = AttackOutcome(found, candidate, torch.zeros(16), "probe")
        for d in (verify_exact(checker, x.view(16, 1, 4, 4), outcome, top), verify_float32(checker, x.view(16, 1, 4, 4), outcome, top)):
            if real:
                assert bool(torch.isfinite(d).all()) and torch.allclose(d, truth * factor, rtol=1e-5)
            else:
                assert bool(torch.isinf(d).all())
    outside = (x + 5.0).float().view(16, 1, 4, 4)  # a class change, but outside the pixel box
    outcome = AttackOutcome(found, outside, torch.zeros(16), "probe")
    assert bool(torch.isinf(verify_exact(checker, x.view(16, 1, 4, 4), outcome, top)).all())


def test_frozen_cpl_models_have_no_violation_on_fashion_mnist():
    """Frozen models (random weights) on real test points: no violation.

    1,000 points on a dense CPL model with the full AutoAttack-style ensemble at the reference budget,
    and 100 points on the convolutional cpl-tiny with the minimum-norm attack.
    """
    data = cpl_cert.load_dataset("fashion-mnist")
    for overrides, limit, attack in (
        (dict(conv_depth=0, channels=1, dense_depth=2, dense_inner=64), 1000, "autoattack"),
        ({}, 100, "minnorm"),
    ):
        torch.manual_seed(0)
        model = cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, **overrides))
        subset = data.subset(limit)
        cert = cpl_cert.certify(model, subset, eps=[0.1, 0.5], device="cpu")
        images = subset.images.float() / 255
        suite = run_suite(model, images, cert.predictions, [0.1, 0.5], attack=attack,
                          reference_float32=cert.predictions_float32, clean=exact_points(subset.images))
        assert suite.rejected == 0 or attack == "autoattack"
        assert find_violations(suite, cert) == []
        assert bool(torch.isfinite(suite.min_distance).float().mean() > 0.9)  # the attacks did find examples
        assert bool((suite.min_distance >= cert.radii_exact).all())
        assert bool((suite.distance_float32.min(dim=0).values >= cert.radii_float32).all())
