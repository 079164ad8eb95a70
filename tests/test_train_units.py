"""Schedule shape, losses against hand computations, and the on-device augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from cpl_cert.errors import CplCertError
from cpl_cert.layers import LLNHead, TruncationHead
from cpl_cert.train.augment import Augment, make_augment
from cpl_cert.train.losses import hinge_loss, make_loss, offset_cross_entropy, pair_constants
from cpl_cert.train.schedule import triangular_factor, triangular_lr


def test_schedule_shape():
    total = 1001  # steps 0..1000, so 40 % and 80 % fall on exact steps
    peak = 0.01
    assert triangular_lr(0, total, peak) == 0.0
    assert triangular_lr(400, total, peak) == pytest.approx(peak)
    assert triangular_lr(800, total, peak) == pytest.approx(peak / 20)
    assert triangular_lr(1000, total, peak) == 0.0
    assert triangular_lr(200, total, peak) == pytest.approx(peak / 2)
    assert triangular_lr(900, total, peak) == pytest.approx(peak / 40)
    values = [triangular_factor(s, total) for s in range(total)]
    assert max(values) == pytest.approx(1.0) and values.index(max(values)) == 400
    assert all(b >= a for a, b in zip(values[:400], values[1:401], strict=True))
    assert all(b <= a for a, b in zip(values[400:-1], values[401:], strict=True))


def test_schedule_uneven_total_still_ends_at_zero():
    total = 7 * 235
    assert triangular_factor(0, total) == 0.0
    assert triangular_factor(total - 1, total) == 0.0
    assert 0.0 < triangular_factor(1, total) < 0.01


def test_hinge_loss_by_hand():
    logits = torch.tensor([[2.0, 1.5, -1.0], [0.0, 0.2, 0.1]])
    labels = torch.tensor([0, 2])
    m = 0.7
    # sample 0: j=1: max(0, .7 - 2 + 1.5) = .2 ; j=2: max(0, .7 - 2 - 1) = 0 -> (0.2 + 0) / 3
    # sample 1: j=0: .7 - .1 + 0 = .6 ; j=1: .7 - .1 + .2 = .8 -> 1.4 / 3
    expected = ((0.2 + 0.0) / 3 + (0.6 + 0.8) / 3) / 2
    assert hinge_loss(logits, labels, m).item() == pytest.approx(expected, abs=1e-6)
    assert make_loss("hinge", margin=m)(logits, labels).item() == pytest.approx(expected, abs=1e-6)


def test_offset_ce_by_hand():
    logits = torch.tensor([[1.0, 0.5, -0.5]])
    labels = torch.tensor([1])
    offset, t = 2.1213, 0.25
    shifted = [1.0 / t, (0.5 - offset) / t, -0.5 / t]
    log_sum = math.log(sum(math.exp(v) for v in shifted))
    expected = t * (log_sum - shifted[1])
    assert offset_cross_entropy(logits, labels, offset, t).item() == pytest.approx(expected, rel=1e-5)
    assert make_loss("offset-ce")(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_bad_loss_options():
    with pytest.raises(CplCertError):
        make_loss("mse")
    with pytest.raises(CplCertError):
        make_loss("hinge", margin=0)
    with pytest.raises(CplCertError, match="head"):
        make_loss("radius-hinge")


def _radius_hinge_by_hand(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, margin: float) -> float:
    """float64 loops: mean over samples of sum_{j != y} max(0, margin - (f_y - f_j) / ||w_y - w_j||) / K."""
    w = weight.double() / weight.double().norm(dim=1, keepdim=True)
    total = 0.0
    for f, y in zip(logits.double(), labels.tolist(), strict=True):
        for j in range(len(f)):
            if j != y:
                radius = float(f[y] - f[j]) / float((w[y] - w[j]).norm())
                total += max(0.0, margin - radius) / len(f)
    return total / len(labels)


def test_radius_hinge_with_lln_head_matches_float64_loops():
    torch.manual_seed(0)
    head = LLNHead(6, 4)
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    got = make_loss("radius-hinge", margin=0.8, head=head)(logits, labels)
    assert got.item() == pytest.approx(_radius_hinge_by_hand(logits, labels, head.weight.detach(), 0.8), rel=1e-5)
    got.backward()  # the pair constants are differentiable and their diagonal (sqrt of 0) does not poison the gradient
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


def test_radius_losses_with_truncation_head_are_rescaled_logit_losses():
    torch.manual_seed(1)
    logits, labels = torch.randn(7, 10) * 2, torch.randint(0, 10, (7,))
    head, r2 = TruncationHead(10), math.sqrt(2.0)
    assert pair_constants(head)[0, 1].item() == pytest.approx(r2)
    radius = make_loss("radius-hinge", margin=0.5, head=head)(logits, labels)
    assert radius.item() == pytest.approx(hinge_loss(logits, labels, 0.5 * r2).item() / r2, rel=1e-5)
    radius_ce = make_loss("radius-ce", offset=1.5, temperature=0.25, head=head)(logits, labels)
    plain_ce = offset_cross_entropy(logits / r2, labels, 1.5, 0.25)
    assert radius_ce.item() == pytest.approx(plain_ce.item(), rel=1e-5)


def test_crop_is_a_shift_with_zero_fill():
    images = torch.arange(1, 2 * 28 * 28 + 1, dtype=torch.int64).reshape(2, 1, 28, 28).to(torch.uint8)
    images[images == 0] = 1  # no natural zeros, so zeros can only come from the padding
    aug = Augment(pad=2, mode="constant")
    out = aug(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    for b in range(2):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.nn.functional.pad(images[b].int(), (2, 2, 2, 2))
                window = padded[:, 2 + dy : 2 + dy + 28, 2 + dx : 2 + dx + 28]
                found |= torch.equal(window.to(torch.uint8), out[b])
        assert found


def test_augment_is_deterministic_and_flip_works():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = make_augment("auto", (3, 32, 32))
    assert aug.flip and aug.pad == 4 and aug.mode == "reflect"
    a = aug(images, torch.Generator().manual_seed(0))
    b = aug(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    flip_only = Augment(flip=True)(images, torch.Generator().manual_seed(1))
    flipped = (flip_only == images.flip(3)).flatten(1).all(1)
    same = (flip_only == images).flatten(1).all(1)
    assert bool((flipped | same).all()) and 10 < int(flipped.sum()) < 54
    assert make_augment("auto", (1, 28, 28)) == Augment(2, "constant", False)
    assert make_augment("none", (1, 28, 28)).describe() == "none"
