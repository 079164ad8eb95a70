"""The soundness campaign: try to beat cpl-cert's Lipschitz bound with exact Jacobians and secant ascent, and its
certified radii in each sense with a verified minimum-norm search, on every configuration of ``configurations``
(run at scale by benchmarks/soundness_campaign.py, in the suite by test_campaign.py on the quick ones)."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sll_net import SLLArch, training_checkpoint

import cpl_cert
from cpl_cert.attacks.check import make_checker, verify_any, verify_exact, verify_float32
from cpl_cert.attacks.common import AttackOutcome
from cpl_cert.attacks.minnorm import fmn_l2
from cpl_cert.layers import POTENTIAL_LAYER_TYPES, SLL_LAYER_TYPES
from cpl_cert.models import float64_copy
from cpl_cert.numerics import strict_math
from cpl_cert.radii import exact_points


@dataclass
class Outcome:
    """What one configuration gave."""

    name: str
    upper: float
    lower: float
    points: int
    worst_exact: float  # min over attacked points of distance / radius_exact (inf: no example found)
    worst_float32: float  # the same for cpl-cert's float32 network and radius_float32
    worst_any: float  # the same for PyTorch's plain float32 forward and radius_any
    violations: int
    compared: int  # points with a verified adversarial example and a positive radius, in either sense


# --- configurations --------------------------------------------------------------------------------------
def _layers(model: cpl_cert.CPLNet) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, POTENTIAL_LAYER_TYPES)]


def _build(preset: str, shape: tuple[int, int, int], seed: int, **overrides: object) -> cpl_cert.CPLNet:
    torch.manual_seed(seed)
    classes = overrides.pop("num_classes", 5)
    return cpl_cert.build_model(preset, input_shape=shape, num_classes=classes, **overrides)


def _frozen(preset: str, shape: tuple[int, int, int], seed: int, **overrides: object) -> cpl_cert.CPLNet:
    return cpl_cert.freeze(_build(preset, shape, seed, **overrides))


def _scaled(factor: float) -> Callable[[cpl_cert.CPLNet], cpl_cert.CPLNet]:
    def apply(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
        with torch.no_grad():
            for layer in _layers(model):
                layer.weight.mul_(factor)
        return model

    return apply


def _all_active(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
    """Large positive biases: every ReLU on, each layer's Jacobian is I - h W^T W (its worst case)."""
    with torch.no_grad():
        for layer in _layers(model):
            layer.bias.fill_(50.0)
    return cpl_cert.freeze(model)


def _near_identity(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
    with torch.no_grad():
        for layer in _layers(model):
            layer.weight.mul_(1e-3)
    return cpl_cert.freeze(model)


def _trained(model: cpl_cert.CPLNet, steps: int = 30) -> cpl_cert.CPLNet:
    """A few Adam steps of the hinge loss on random labelled images, then frozen."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = torch.rand((32, *model.config.input_shape), generator=generator)
        y = torch.randint(0, model.config.num_classes, (32,), generator=generator)
        loss = F.multi_margin_loss(model(x), y, margin=0.7)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cpl_cert.freeze(model)


def _rescaled(std: float) -> Callable[[cpl_cert.CPLNet], cpl_cert.CPLNet]:
    """Mean 0, std ``std`` and every bias divided by ``std``: the same network on inputs scaled by ``1 / std``."""
    def apply(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
        with torch.no_grad():
            model.normalize.mean.zero_()
            model.normalize.std.fill_(std)
            for layer in _layers(model):
                layer.bias.div_(std)
            if isinstance(model.head, torch.nn.Module) and hasattr(model.head, "bias"):
                model.head.bias.div_(std)
        return model

    return apply


def _t_scaled(factor: float) -> Callable[[cpl_cert.CPLNet], cpl_cert.CPLNet]:
    """Every SLL layer's frozen rescaling multiplied by ``factor``."""
    def apply(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
        for layer in _layers(model):
            if isinstance(layer, SLL_LAYER_TYPES):
                layer.set_frozen_t(layer.t * factor)
        return model

    return apply


SCALES: dict[str, float] = {"inputs x1e-25": 1e-25, "inputs x1e25": 1e25, "inputs x1e-25, no cpl pool 2": 1e-25}
"""Configurations whose images are float tensors multiplied by this factor (the others: uint8 pixels)."""


def extreme_configurations() -> list[tuple[str, Callable[[], cpl_cert.CPLNet]]]:
    """Tiny and huge activations: where norms underflow or overflow in float32."""
    zero_mean = dict(mean=(0.0,))
    return [
        ("inputs x1e-25", lambda: _frozen("cpl-tiny", (1, 8, 8), 19, **zero_mean)),
        ("inputs x1e25", lambda: _frozen("cpl-tiny", (1, 8, 8), 20, **zero_mean)),
        ("inputs x1e-25, no cpl pool 2", lambda: _frozen("cpl-tiny", (1, 8, 8), 14, channels=1, conv_depth=0, dense_depth=0, pool=2,
                                                         **zero_mean)),
        ("std 1e25, biases / 1e25", lambda: _rescaled(1e25)(_frozen("cpl-xs", (1, 8, 8), 21, head="lln"))),
        ("std 1e-25, biases x 1e25", lambda: _rescaled(1e-25)(_frozen("cpl-tiny", (1, 8, 8), 22))),
    ]


def paper_configurations() -> list[tuple[str, Callable[[], cpl_cert.CPLNet]]]:
    """The paper's network sizes at CIFAR's input shape (slow: minutes each)."""
    return [(f"{p} (3, 32, 32) {h}", lambda p=p, h=h, i=i: _frozen(p, (3, 32, 32), 30 + i, head=h, num_classes=10))
            for i, (p, h) in enumerate((("cpl-s", "truncation"), ("cpl-s", "lln"), ("cpl-m", "truncation")))]


def _hadamard(model: cpl_cert.CPLNet) -> cpl_cert.CPLNet:
    """Dense SLL layers with orthogonal rows (a scaled Hadamard matrix): ``||diag(sqrt t) W|| = 1`` exactly."""
    with torch.no_grad():
        for layer in model.dense:
            n = layer.weight.shape[1]
            rows = torch.ones(1, 1)
            while rows.shape[0] < n:
                rows = torch.cat([torch.cat([rows, rows], 1), torch.cat([rows, -rows], 1)], 0)
            layer.weight.copy_(rows[: layer.weight.shape[0], :n] * 2.0 ** torch.arange(layer.weight.shape[0]).remainder(3)[:, None])
            layer.bias.fill_(5.0)
    return cpl_cert.freeze(model)


def _imported_sll(version: str, q_scale: float, steps: str, lln: bool = True) -> cpl_cert.CPLNet:
    """A network imported from an SLL-code checkpoint built by the tests' stand-in (random weights)."""
    arch = SLLArch(version, 1, 2, 4, 3, 24, lln=lln)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pth"
        torch.save(training_checkpoint(arch, seed=len(version), q_scale=q_scale), path)
        return cpl_cert.import_sll(path, "cifar10", steps=steps).model  # type: ignore[arg-type]


def _sll_variants() -> list[tuple[str, Callable[[], cpl_cert.CPLNet]]]:
    """SLL layers: presets, rescaling scaled after freezing, tight and all-active layers, trained, imported."""
    return [
        ("sll t x1.3 after freezing", lambda: _t_scaled(1.3)(_frozen("sll-xs", (1, 8, 8), 20, head="lln"))),
        ("sll weights x1.2 after freezing", lambda: _scaled(1.2)(_frozen("sll-xs", (1, 12, 12), 21))),
        ("sll unfrozen", lambda: _build("sll-xs", (1, 8, 8), 22).eval()),
        ("sll all units active", lambda: _all_active(_build("sll-xs", (1, 8, 8), 23))),
        ("sll hadamard dense (tight t)", lambda: _hadamard(_build("sll-xs", (1, 16, 16), 24, conv_depth=0, channels=1, dense_inner=8))),
        ("sll hadamard, t x1.1", lambda: _t_scaled(1.1)(_hadamard(_build("sll-xs", (1, 16, 16), 25, conv_depth=0, channels=1,
                                                                                dense_inner=8)))),
        ("sll trained xs lln", lambda: _trained(_build("sll-xs", (1, 8, 8), 26, head="lln"))),
        ("imported sll current", lambda: _imported_sll("current", 1.0, "reference")),
        ("imported sll earlier", lambda: _imported_sll("earlier", 1.0, "reference", lln=False)),
        ("imported sll earlier small |q|", lambda: _imported_sll("earlier", 3e-6, "reference")),
        ("imported sll earlier small |q| certified", lambda: _imported_sll("earlier", 3e-6, "certified")),
    ]


def configurations(quick: bool = False) -> list[tuple[str, Callable[[], cpl_cert.CPLNet]]]:
    """(name, builder) pairs; ``quick`` keeps one of each kind."""
    shapes = [(1, 8, 8), (3, 8, 8), (1, 12, 12)]
    small = ["cpl-tiny", "cpl-xs", "cpl-sm", "sll-xs"]
    paper = ["cpl-s", "cpl-m", "cpl-l", "cpl-xl", "sll-s", "sll-m", "sll-l", "sll-xl"]
    configs: list[tuple[str, Callable[[], cpl_cert.CPLNet]]] = []
    for i, preset in enumerate(small + paper):
        for j, shape in enumerate(shapes if preset in small else shapes[:2]):
            for head in ("truncation", "lln"):
                name = f"{preset} {shape} {head}"
                configs.append((name, lambda p=preset, s=shape, h=head, k=i * 10 + j: _frozen(p, s, k, head=h)))
    variants: list[tuple[str, Callable[[], cpl_cert.CPLNet]]] = [
        ("std != 1", lambda: _frozen("cpl-tiny", (3, 8, 8), 1, mean=(0.4, 0.5, 0.6), std=(0.25, 0.5, 0.3))),
        ("std != 1 lln", lambda: _frozen("cpl-xs", (3, 8, 8), 2, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), head="lln")),
        ("scaled x1.05", lambda: _scaled(1.05)(_frozen("cpl-tiny", (1, 8, 8), 3))),
        ("scaled x1.3 lln", lambda: _scaled(1.3)(_frozen("cpl-xs", (1, 8, 8), 4, head="lln"))),
        ("scaled x0.7", lambda: _scaled(0.7)(_frozen("cpl-sm", (1, 8, 8), 5))),
        ("unfrozen", lambda: _build("cpl-tiny", (1, 8, 8), 6).eval()),
        ("unfrozen lln", lambda: _build("cpl-xs", (1, 12, 12), 7, head="lln").eval()),
        ("all units active", lambda: _all_active(_build("cpl-tiny", (1, 8, 8), 8))),
        ("all units active xs", lambda: _all_active(_build("cpl-xs", (1, 8, 8), 9))),
        ("near identity", lambda: _near_identity(_build("cpl-xs", (1, 8, 8), 10))),
        ("one layer, all active, x1.2", lambda: _scaled(1.2)(_all_active(_build("cpl-tiny", (1, 4, 4), 17, channels=1, conv_depth=0,
                                                                                  dense_depth=1, dense_inner=8, pool=1)))),
        ("one conv, all active, x1.1", lambda: _scaled(1.1)(_all_active(_build("cpl-tiny", (2, 6, 6), 18, conv_depth=1,
                                                                                 dense_depth=0, pool=1, channels=2)))),
        ("trained tiny", lambda: _trained(_build("cpl-tiny", (1, 8, 8), 11))),
        ("trained xs lln", lambda: _trained(_build("cpl-xs", (1, 8, 8), 12, head="lln"))),
        ("trained sm", lambda: _trained(_build("cpl-sm", (3, 8, 8), 13))),
        ("no cpl pool 2", lambda: _frozen("cpl-tiny", (1, 8, 8), 14, channels=1, conv_depth=0, dense_depth=0, pool=2)),
        ("dense only", lambda: _frozen("cpl-tiny", (1, 8, 8), 15, channels=1, conv_depth=0, dense_depth=3, dense_inner=64, pool=1)),
        ("conv only lln", lambda: _frozen("cpl-tiny", (1, 8, 8), 16, conv_depth=3, dense_depth=0, head="lln")),
    ]
    configs += variants + extreme_configurations() + _sll_variants()
    if quick:
        keep = {"cpl-tiny (1, 8, 8) truncation", "cpl-xs (3, 8, 8) lln", "std != 1", "scaled x1.3 lln", "unfrozen",
                "all units active", "trained tiny", "no cpl pool 2", "one layer, all active, x1.2", "inputs x1e-25",
                "std 1e25, biases / 1e25", "sll-xs (3, 8, 8) lln", "sll t x1.3 after freezing", "sll hadamard, t x1.1",
                "imported sll current", "imported sll earlier small |q|"}
        return [c for c in configs if c[0] in keep]
    return configs + paper_configurations()


# --- the two checks ------------------------------------------------------------------------------------------
def jacobian_lower_bound(model: cpl_cert.CPLNet, inputs: torch.Tensor, ascent_steps: int = 40) -> float:
    """Largest ||J(x)|| of the body found: at ``inputs`` exact SVDs (small inputs) or power iteration on J^T J
    (large ones, where the full Jacobian is too costly), then secant-ratio gradient ascent; every value is attained."""
    exact = float64_copy(model)
    best = 0.0
    for x in inputs.double():
        best = max(best, _jacobian_norm(exact, x[None]))
    x = inputs.double().clone().requires_grad_(True)
    d = (1e-3 * torch.randn_like(x)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, d], lr=1e-2)
    for _ in range(ascent_steps):
        ratio = (exact.features(x + d) - exact.features(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    return best


def _jacobian_norm(exact: torch.nn.Module, x: torch.Tensor, svd_limit: int = 1024, iterations: int = 30) -> float:
    """||J(x)||_2 by SVD when x has at most ``svd_limit`` entries, else the largest ||J v|| (unit v) power iteration
    on J^T J reaches: a lower bound on ||J||_2, which is all the check needs."""
    if x.numel() <= svd_limit:
        jac = torch.func.jacrev(exact.features)(x).reshape(-1, x.numel())
        return float(torch.linalg.svdvals(jac)[0])
    v, best = torch.randn_like(x), 0.0
    for _ in range(iterations):
        v = v / v.norm()
        jv, pullback = torch.func.jvp(exact.features, (x,), (v,))[1], torch.func.vjp(exact.features, x)[1]
        best = max(best, float(jv.norm()))
        v = pullback(jv)[0]
    return best


class _Rescaled(torch.nn.Module):
    """``model(u * inputs) / outputs``: lets FMN (whose steps and margins are in pixel and logit units) attack
    a model at any input and logit scale; its examples ``u`` stand for the inputs ``u * inputs``."""

    def __init__(self, model: torch.nn.Module, inputs: float, outputs: float) -> None:
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(u * self.inputs) / self.outputs


def _fmn(model: torch.nn.Module, clean: torch.Tensor, reference: torch.Tensor, steps: int, scale: float) -> AttackOutcome:
    """FMN on ``model`` in units where the pixel box is [0, 1] and the logits are about 1; examples in the model's units."""
    with torch.no_grad():
        outputs = float(model(clean).abs().max().clamp_min(1e-300))
    outcome = fmn_l2(_Rescaled(model, scale, outputs), clean / scale, reference, steps=steps)
    return dataclasses.replace(outcome, adversarial=(outcome.adversarial * scale).to(clean.dtype))


def worst_ratios(model: cpl_cert.CPLNet, images: torch.Tensor, steps: int, scale: float) -> tuple[list[float], int, int]:
    """Smallest adversarial-distance / radius ratio in each sense (exact, cpl-cert's float32, plain float32),
    the number of violations and of points where a comparison was possible."""
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    cert = cpl_cert.certify(model, (images, labels), eps=[0.1], device="cpu")
    clean, box = exact_points(images), (0.0, scale)
    with strict_math():
        checker = make_checker(model)
        reference = cert.predictions.clamp_min(0)
        exact_attack = _fmn(checker.model64, clean, reference, steps, scale)
        float32_attack = _fmn(model, clean.float(), cert.predictions_float32.clamp_min(0), steps, scale)
        any_attack = _fmn(model, clean.float(), cert.predictions_any.clamp_min(0), steps, scale)
        distances = (verify_exact(checker, clean, exact_attack, reference, box),
                     verify_float32(checker, clean, float32_attack, cert.predictions_float32.clamp_min(0), box),
                     verify_any(model, clean, any_attack, cert.predictions_any.clamp_min(0), box))
    ratios = [_ratios(d, r) for d, r in zip(distances, (cert.radii_exact, cert.radii_float32, cert.radii_any), strict=True)]
    violations = int(torch.stack([r < 1 for r in ratios]).any(dim=0).sum())
    compared = int(torch.stack([torch.isfinite(r) for r in ratios]).any(dim=0).sum())
    return [float(r.min()) for r in ratios], violations, compared


def _ratios(distance: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """distance / radius where both are positive and finite (inf elsewhere: nothing to compare)."""
    usable = torch.isfinite(distance) & (radius > 0)
    return torch.where(usable, distance / radius.clamp_min(1e-300), torch.full_like(distance, math.inf))


def run_config(name: str, build: Callable[[], cpl_cert.CPLNet], points: int, steps: int) -> Outcome:
    model = build()
    shape = model.config.input_shape
    generator = torch.Generator().manual_seed(len(name))
    images = torch.randint(0, 256, (points, *shape), generator=generator, dtype=torch.uint8)
    scale = SCALES.get(name)
    if scale is not None:
        images = (images.float() / 255 * scale).float()
    upper = cpl_cert.lipschitz_bounds(model).body_upper
    lower = jacobian_lower_bound(model, exact_points(images[: min(points, 4)]))
    worst, violations, compared = worst_ratios(model, images, steps, scale or 1.0)
    return Outcome(name, upper, lower, points, *worst, violations, compared)
