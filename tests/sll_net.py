"""A stand-in for the SLL code (araujoalexandre/Lipschitz-SLL-Networks), written for the tests from the layouts in
issue 19: both layer versions' module trees (so their key names come from torch itself) and their forward passes
in plain torch ops. Nothing here calls cpl-cert.

Checked once against the SLL code itself (a scratch checkout of both versions, networks trained a few steps and
saved by its own classes): ``sll_logits`` gave its eval logits to within float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MEANS = {"cifar10": (0.4913, 0.4821, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409), "tiny-imagenet": (0.485, 0.456, 0.406)}
PREFIX = "module.model."


@dataclass(frozen=True)
class SLLArch:
    version: str  # "current" or "earlier"
    n_conv: int
    n_dense: int
    w: int
    conv_inner: int
    dense_inner: int
    lln: bool = True
    num_classes: int = 10
    size: int = 32

    @property
    def features(self) -> int:
        return self.w * (self.size // 4) ** 2


class _Layer(nn.Module):
    def __init__(self, weight_name: str, shape: tuple[int, ...], bias_shape: tuple[int, ...], g: torch.Generator, q_scale: float) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        setattr(self, weight_name, nn.Parameter(torch.randn(shape, generator=g) * math.sqrt(2.0 / (fan_in + shape[0]))))
        self.bias = nn.Parameter((torch.rand(bias_shape, generator=g) * 2 - 1) / math.sqrt(fan_in))
        self.q = nn.Parameter(torch.randn(shape[0], generator=g) * q_scale)


def _wrap(net: nn.Module) -> nn.Module:
    normalized = nn.Module()
    normalized.model = net  # NormalizedModel keeps its means outside the state_dict
    return nn.DataParallel(normalized)


def sll_module(arch: SLLArch, seed: int = 0, q_scale: float = 1.0) -> nn.Module:
    """The SLL code's module tree (random weights) as its trainer wraps it; ``q_scale`` scales q (earlier version:
    small |q| make its dense layers' epsilon matter)."""
    g = torch.Generator().manual_seed(seed)
    current = arch.version == "current"
    convs = [_Layer("kernel", (arch.conv_inner, arch.w, 3, 3), (1, arch.conv_inner, 1, 1) if current else (arch.conv_inner,), g, q_scale)
             for _ in range(arch.n_conv)]
    dense_name = "weight" if current else "weights"
    dense = [_Layer(dense_name, (arch.dense_inner, arch.features), (1, arch.dense_inner) if current else (arch.dense_inner,), g, q_scale)
             for _ in range(arch.n_dense)]
    head = nn.Linear(arch.features, arch.num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(torch.randn(arch.num_classes, generator=g) * 0.1)
    net = nn.Module()
    if current:
        net.model = nn.Sequential(nn.Identity(), *convs, nn.AvgPool2d(4, divisor_override=4), nn.Flatten(), *dense, head)
        return _wrap(net)
    net.conv1 = nn.Identity()
    net.stable_block = nn.Sequential(*convs, nn.AvgPool2d(4, divisor_override=4))
    net.layers_linear = nn.Sequential(nn.Flatten(), *dense)
    if arch.lln:
        net.last_last = head
    net.base = nn.Sequential(net.conv1, net.stable_block, net.layers_linear)
    return _wrap(net)


def training_checkpoint(arch: SLLArch, seed: int = 0, q_scale: float = 1.0) -> dict[str, object]:
    """What the SLL trainer saves: epoch, global step, the model's and an Adam optimiser's state_dicts."""
    module = sll_module(arch, seed, q_scale)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01, betas=(0.5, 0.9))
    return {"epoch": 3, "global_step": 300, "model_state_dict": module.state_dict(), "optimizer_state_dict": optimizer.state_dict()}


def _cross(kernel: torch.Tensor) -> torch.Tensor:
    """``sum over shifts |<K_i, K_j shifted>|`` (inner x inner), by explicit shifts, in the kernel's precision."""
    inner, _, k, _ = kernel.shape
    padded = F.pad(kernel, (k - 1, k - 1, k - 1, k - 1))
    total = torch.zeros(inner, inner, dtype=kernel.dtype)
    for dy in range(2 * k - 1):
        for dx in range(2 * k - 1):
            total += torch.einsum("acyx,bcyx->ab", kernel, padded[:, :, dy : dy + k, dx : dx + k]).abs()
    return total


def layer_factor(arch: SLLArch, weight: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The per-unit factor multiplying ``relu(W x + b)`` before ``W^T`` (2 t, or the earlier version's T), float64."""
    w, q = weight.double(), q.double()
    cross = _cross(w) if w.dim() == 4 else (w @ w.t()).abs()
    if arch.version == "current":
        if w.dim() == 4:  # its q and 1/q are broadcast along the same axis and cancel
            sums = cross.sum(dim=1)
        else:
            sums = (cross * q.exp()[None, :] / q.exp()[:, None]).sum(dim=1)
        return torch.where(sums > 0, 2.0 / sums, torch.zeros_like(sums))
    q_abs = q.abs()
    if w.dim() == 4:
        return 2.0 * q_abs / (cross * q_abs[None, :]).sum(dim=1)
    return 2.0 * (q_abs + 1e-6) / (cross * q_abs[None, :]).sum(dim=1)


def _sll_step(arch: SLLArch, state: dict[str, torch.Tensor], key: str, weight_name: str, x: torch.Tensor) -> torch.Tensor:
    """``x - W^T (factor * relu(W x + b))`` for one layer (conv or dense)."""
    w, b = state[f"{key}.{weight_name}"], state[f"{key}.bias"]
    factor = layer_factor(arch, w, state[f"{key}.q"]).float()
    if w.dim() == 4:
        hidden = F.relu(F.conv2d(x, w, padding=1) + b.view(1, -1, 1, 1)) * factor.view(1, -1, 1, 1)
        return x - F.conv_transpose2d(hidden, w, padding=1)
    return x - F.linear(F.relu(F.linear(x, w) + b.view(1, -1)) * factor, w.t())


def sll_logits(state: dict[str, torch.Tensor], arch: SLLArch, x: torch.Tensor) -> torch.Tensor:
    """The SLL network's eval forward on images in [0, 1] (float32, factors from ``layer_factor``)."""
    x = x - torch.tensor(MEANS_FOR[arch.size, arch.num_classes])[None, :, None, None]
    x = F.pad(x, (0, 0, 0, 0, 0, arch.w - 3))
    keys = layer_keys(arch)
    for key, weight_name in keys[: arch.n_conv]:
        x = _sll_step(arch, state, key, weight_name, x)
    x = F.avg_pool2d(x, 4, divisor_override=4).flatten(1)
    for key, weight_name in keys[arch.n_conv :]:
        x = _sll_step(arch, state, key, weight_name, x)
    if not arch.lln:
        return x[:, : arch.num_classes]
    head = f"{PREFIX}model.{arch.n_conv + 3 + arch.n_dense}" if arch.version == "current" else f"{PREFIX}last_last"
    w = state[f"{head}.weight"]
    return F.linear(x, w / w.norm(dim=1, keepdim=True), state[f"{head}.bias"])


MEANS_FOR = {(32, 10): MEANS["cifar10"], (32, 100): MEANS["cifar100"], (64, 200): MEANS["tiny-imagenet"]}


def layer_keys(arch: SLLArch) -> list[tuple[str, str]]:
    """(key prefix, weight name) of each SLL layer in forward order."""
    if arch.version == "current":
        convs = [(f"{PREFIX}model.{i + 1}", "kernel") for i in range(arch.n_conv)]
        return convs + [(f"{PREFIX}model.{arch.n_conv + 3 + j}", "weight") for j in range(arch.n_dense)]
    convs = [(f"{PREFIX}stable_block.{i}", "kernel") for i in range(arch.n_conv)]
    return convs + [(f"{PREFIX}layers_linear.{j + 1}", "weights") for j in range(arch.n_dense)]
