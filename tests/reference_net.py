"""A stand-in for the CPL paper's reference code, written for the tests from the layout in issue 12.

``reference_state_dict`` builds the module tree the reference saves (DataParallel -> normalised
model -> network with ``stable_block``, ``layers_linear``, ``last_last`` and the ``base`` Sequential
that reaches the same modules again), so its key names come from torch itself. ``reference_logits``
is the reference forward pass in plain torch ops on that state_dict, with its own power iteration:
nothing here calls cpl-cert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CIFAR10_MEAN = (0.4913997551666284, 0.48215855929893703, 0.4465309133731618)
CIFAR10_STD = (0.24703225141799082, 0.24348516474564, 0.26158783926049628)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
PREFIX = "module.model."


@dataclass(frozen=True)
class Arch:
    depth: int
    num_channels: int
    conv_size: int
    depth_linear: int
    n_features: int
    lln: bool
    num_classes: int = 10


class _Vector(nn.Module):
    """Holds the power-iteration vector as the reference does (a parameter that needs no gradient)."""

    def __init__(self, shape: tuple[int, ...], generator: torch.Generator) -> None:
        super().__init__()
        u = torch.randn(shape, generator=generator)
        self.u = nn.Parameter(u / u.norm(), requires_grad=False)


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)


class _Conv(nn.Module):
    def __init__(self, channels: int, inner: int, generator: torch.Generator) -> None:
        super().__init__()
        fan_in = channels * 9
        self.kernel = _uniform((inner, channels, 3, 3), 1 / math.sqrt(fan_in), generator)
        self.bias = _uniform((inner,), 1 / math.sqrt(fan_in), generator)
        self.register_buffer("eval_sv_max", torch.zeros(1))
        self.pm = _Vector((1, channels, 32, 32), generator)


class _Dense(nn.Module):
    def __init__(self, features: int, inner: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weights = _uniform((inner, features), 1 / math.sqrt(features), generator)
        self.bias = _uniform((inner,), 1 / math.sqrt(features), generator)
        self.register_buffer("eval_sv_max", torch.zeros(1))
        self.pm = _Vector((1, features), generator)
        self.alpha = nn.Parameter(torch.zeros(1))


def reference_module(arch: Arch, seed: int = 0) -> nn.Module:
    """The reference's module tree (random weights) wrapped as its trainer wraps it."""
    g = torch.Generator().manual_seed(seed)
    features = arch.num_channels * 64
    net = nn.Module()
    net.conv1 = nn.Identity()  # channel padding: no tensors
    net.stable_block = nn.Sequential(*[_Conv(arch.num_channels, arch.conv_size, g) for _ in range(arch.depth)], nn.AvgPool2d(4, divisor_override=4))
    net.layers_linear = nn.Sequential(nn.Flatten(), *[_Dense(features, arch.n_features, g) for _ in range(arch.depth_linear)])
    if arch.lln:
        net.last_last = nn.Linear(features, arch.num_classes)
        with torch.no_grad():
            net.last_last.weight.copy_(torch.randn(arch.num_classes, features, generator=g))
            net.last_last.bias.copy_(torch.randn(arch.num_classes, generator=g) * 0.1)
    net.base = nn.Sequential(net.conv1, net.stable_block, net.layers_linear)
    wrapper = nn.Module()
    wrapper.model = net
    return nn.DataParallel(wrapper)


def power_sigma(weight: torch.Tensor, u: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """The reference's evaluation estimate: ``iters`` power iterations (conv by explicit zero padding)."""
    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / (torch.sqrt((t**2).sum()) + 1e-12)

    if weight.dim() == 4:
        def w(x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(F.pad(x, (1, 1, 1, 1)), weight)

        def wt(y: torch.Tensor) -> torch.Tensor:
            return F.pad(F.conv_transpose2d(y, weight), (-1, -1, -1, -1))
    else:
        def w(x: torch.Tensor) -> torch.Tensor:
            return x @ weight.t()

        def wt(y: torch.Tensor) -> torch.Tensor:
            return y @ weight

    for _ in range(iters):
        v = unit(w(u))
        u = unit(wt(v))
    return (w(u) * v).sum()


def layer_keys(arch: Arch) -> list[tuple[str, str]]:
    """(key prefix, weight name) of each CPL layer in forward order."""
    convs = [(f"{PREFIX}stable_block.{i}", "kernel") for i in range(arch.depth)]
    return convs + [(f"{PREFIX}layers_linear.{j}", "weights") for j in range(1, arch.depth_linear + 1)]


def reference_sigmas(state: dict[str, torch.Tensor], arch: Arch) -> list[torch.Tensor]:
    """``eval_sv_max`` where it is set, else the 100-iteration estimate from the stored vector."""
    sigmas = []
    for prefix, weight in layer_keys(arch):
        cached = state[f"{prefix}.eval_sv_max"]
        sigmas.append(cached[0] if float(cached[0]) != 0 else power_sigma(state[f"{prefix}.{weight}"], state[f"{prefix}.pm.u"]))
    return sigmas


def reference_logits(
    state: dict[str, torch.Tensor], arch: Arch, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], steps: list[torch.Tensor]
) -> torch.Tensor:
    """The reference forward pass with the given step per CPL layer, on images in [0, 1]."""
    x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
    padded = torch.zeros(x.shape[0], arch.num_channels, 32, 32)
    padded[:, :3] = x
    x = padded
    for step, (prefix, weight) in zip(steps[: arch.depth], layer_keys(arch)[: arch.depth], strict=True):
        k, b = state[f"{prefix}.{weight}"], state[f"{prefix}.bias"]
        x = x - step * F.conv_transpose2d(F.relu(F.conv2d(x, k, bias=b, padding=1)), k, padding=1)
    x = F.avg_pool2d(x, 4, divisor_override=4).flatten(1)
    for step, (prefix, weight) in zip(steps[arch.depth :], layer_keys(arch)[arch.depth :], strict=True):
        w, b = state[f"{prefix}.{weight}"], state[f"{prefix}.bias"]
        x = x - step * F.linear(F.relu(F.linear(x, w, b)), w.t())
    if arch.lln:
        w = state[f"{PREFIX}last_last.weight"]
        return F.linear(x, w / w.norm(dim=1, keepdim=True), state[f"{PREFIX}last_last.bias"])
    return x[:, : arch.num_classes]
