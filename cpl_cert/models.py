"""Architecture configs, the named presets, and ``build_model``.

A CPL network (the paper's design, any input shape): input normalisation -> zero channel padding
-> ``conv_depth`` convolutional CPL layers at full resolution -> one block-sum pool of size ``pool``
-> flatten -> ``dense_depth`` dense CPL layers of the flattened width -> a head. With ``layer="sll"``
the same skeleton holds SLL layers instead (Araujo et al., ICLR 2023; CPL's generalisation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CplCertError
from .layers import (
    POTENTIAL_LAYER_TYPES,
    BlockSumPool,
    ChannelPad,
    CPLConv2d,
    CPLLinear,
    InputNormalization,
    LLNHead,
    SLLConv2d,
    SLLLinear,
    TruncationHead,
)

HEADS = ("truncation", "lln")
LAYER_KINDS = {"cpl": (CPLConv2d, CPLLinear), "sll": (SLLConv2d, SLLLinear)}
"""``layer`` of the config: the (conv, dense) classes of each kind."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a CPL network; JSON-serialisable (``to_dict`` / ``from_dict``)."""

    input_shape: tuple[int, int, int]
    num_classes: int
    channels: int
    conv_depth: int
    dense_depth: int
    conv_inner: int = 5
    dense_inner: int = 2048
    pool: int = 4
    head: str = "truncation"
    layer: str = "cpl"
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]
        self.mean = tuple(float(v) for v in self.mean) if self.mean else (0.0,) * self.input_shape[0]
        if self.std is not None:
            self.std = tuple(float(v) for v in self.std)
        self.validate()

    def validate(self) -> None:
        """Raise ``CplCertError`` with one sentence if the config cannot describe a valid network."""
        sizes = ("num_classes", "channels", "conv_depth", "dense_depth", "conv_inner", "dense_inner", "pool")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CplCertError(f"{name} must be a whole number, got {value!r}")
        if not all(math.isfinite(v) for v in self.mean) or (self.std is not None and not all(math.isfinite(v) for v in self.std)):
            raise CplCertError("mean and std must be finite numbers")
        c, h, w = self.input_shape if len(self.input_shape) == 3 else (0, 0, 0)
        problems = [
            (len(self.input_shape) != 3 or min(self.input_shape) < 1, f"input_shape must be (channels, height, width), got {self.input_shape}"),
            (self.num_classes < 2, f"num_classes must be at least 2, got {self.num_classes}"),
            (self.channels < c, f"channels ({self.channels}) must be at least the input channels ({c})"),
            (self.conv_depth < 0 or self.dense_depth < 0, "conv_depth and dense_depth must be non-negative"),
            (self.conv_inner < 1 or self.dense_inner < 1, "conv_inner and dense_inner must be positive"),
            (self.pool < 1 or self.pool > min(h, w), f"pool ({self.pool}) must be between 1 and the image size ({min(h, w)})"),
            (self.head not in HEADS, f"head must be one of {', '.join(HEADS)}, got {self.head!r}"),
            (self.layer not in LAYER_KINDS, f"layer must be one of {', '.join(LAYER_KINDS)}, got {self.layer!r}"),
            (len(self.mean) != c, f"mean needs one value per input channel ({c}), got {len(self.mean)}"),
            (self.std is not None and (len(self.std) != c or min(self.std) <= 0), "std needs one positive value per input channel"),
        ]
        for failed, message in problems:
            if failed:
                raise CplCertError(message)
        if self.head == "truncation" and self.num_classes > self.dense_width:
            raise CplCertError(
                f"the truncation head keeps {self.num_classes} of {self.dense_width} features; "
                "use more channels, a smaller pool or head='lln'"
            )

    @property
    def pooled_size(self) -> tuple[int, int]:
        return self.input_shape[1] // self.pool, self.input_shape[2] // self.pool

    @property
    def dense_width(self) -> int:
        ph, pw = self.pooled_size
        return self.channels * ph * pw

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; ``layer`` only when it is not ``cpl``, so that a CPL config reads exactly as
        before the field existed (older cpl-cert versions load CPL checkpoints written by this one, and
        refuse SLL ones with one sentence about the unknown key)."""
        data = dataclasses.asdict(self)
        if data["layer"] == "cpl":
            del data["layer"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict (e.g. checkpoint metadata), with one clear error on unknown or missing keys."""
        if not isinstance(data, dict):
            raise CplCertError("the architecture config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CplCertError(f"the architecture config has unknown keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CplCertError(f"the architecture config is incomplete or malformed ({exc})") from None


# The paper's presets (Meunier et al. 2022, CPL-S to CPL-XL) and small ones that train on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "cpl-s": dict(channels=45, conv_depth=20, dense_depth=7, conv_inner=5, dense_inner=2048, pool=4),
    "cpl-m": dict(channels=60, conv_depth=30, dense_depth=10, conv_inner=5, dense_inner=2048, pool=4),
    "cpl-l": dict(channels=90, conv_depth=50, dense_depth=10, conv_inner=5, dense_inner=2048, pool=4),
    "cpl-xl": dict(channels=120, conv_depth=70, dense_depth=15, conv_inner=5, dense_inner=2048, pool=4),
    # Small presets: seconds (tiny) to minutes per epoch (xs, sm) on two CPU cores.
    "cpl-tiny": dict(channels=8, conv_depth=2, dense_depth=2, conv_inner=8, dense_inner=128, pool=4),
    "cpl-xs": dict(channels=16, conv_depth=4, dense_depth=3, conv_inner=16, dense_inner=512, pool=4),
    "cpl-sm": dict(channels=24, conv_depth=6, dense_depth=4, conv_inner=24, dense_inner=1024, pool=4),
    # The SLL code's sizes (Araujo et al. 2023: small to xlarge; conv inner 5 from its reproduce_tables.py),
    # and a CPU size like cpl-xs.
    "sll-s": dict(channels=45, conv_depth=20, dense_depth=7, conv_inner=5, dense_inner=2048, pool=4, layer="sll"),
    "sll-m": dict(channels=60, conv_depth=30, dense_depth=10, conv_inner=5, dense_inner=2048, pool=4, layer="sll"),
    "sll-l": dict(channels=90, conv_depth=50, dense_depth=10, conv_inner=5, dense_inner=2048, pool=4, layer="sll"),
    "sll-xl": dict(channels=120, conv_depth=70, dense_depth=15, conv_inner=5, dense_inner=2048, pool=4, layer="sll"),
    "sll-xs": dict(channels=16, conv_depth=4, dense_depth=3, conv_inner=16, dense_inner=512, pool=4, layer="sll"),
}


class CPLNet(nn.Module):
    """A CPL (or SLL) network. ``body`` maps an image to features; ``head`` maps features to logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.input_shape
        conv, dense = LAYER_KINDS[config.layer]
        self.normalize = InputNormalization(list(config.mean), list(config.std) if config.std else None)
        self.pad = ChannelPad(c, config.channels)
        self.convs = nn.Sequential(*[conv(config.channels, config.conv_inner, (h, w)) for _ in range(config.conv_depth)])
        self.pool = BlockSumPool(config.pool)
        self.flatten = nn.Flatten(1)
        self.dense = nn.Sequential(*[dense(config.dense_width, config.dense_inner) for _ in range(config.dense_depth)])
        if config.head == "lln":
            self.head: nn.Module = LLNHead(config.dense_width, config.num_classes)
        else:
            self.head = TruncationHead(config.num_classes)

    def body(self) -> list[tuple[str, nn.Module]]:
        """The body's stages in forward order (everything before the head), named as in ``state_dict``."""
        return [
            ("normalize", self.normalize),
            ("pad", self.pad),
            *((f"convs.{i}", layer) for i, layer in enumerate(self.convs)),
            ("pool", self.pool),
            ("flatten", self.flatten),
            *((f"dense.{i}", layer) for i, layer in enumerate(self.dense)),
        ]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body: everything before the head."""
        for _, stage in self.body():
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cpl_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of every CPL or SLL layer, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, POTENTIAL_LAYER_TYPES)]


def resolve_config(
    arch: str | ModelConfig | dict[str, Any],
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """A ``ModelConfig`` from a preset name, a dict or a config; ``overrides`` replace fields."""
    if isinstance(arch, ModelConfig):
        base = arch.to_dict()
    elif isinstance(arch, dict):
        base = dict(arch)
    elif isinstance(arch, str):
        if arch not in PRESETS:
            raise CplCertError(f"unknown preset {arch!r}; choose one of {', '.join(PRESETS)}")
        base = dict(PRESETS[arch], preset=arch)
    else:
        raise CplCertError(f"cannot build a model from {type(arch).__name__}")
    if input_shape is not None:
        base["input_shape"] = tuple(input_shape)
    if num_classes is not None:
        base["num_classes"] = num_classes
    base.update({k: v for k, v in overrides.items() if v is not None})
    if "input_shape" not in base or "num_classes" not in base:
        raise CplCertError("input_shape and num_classes are needed to build a model")
    return ModelConfig.from_dict(base)


def build_model(
    arch: str | ModelConfig | dict[str, Any],
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> CPLNet:
    """Build an (unfrozen) CPL network from a preset name or a config.

    >>> model = build_model("cpl-s", input_shape=(3, 32, 32), num_classes=10)
    """
    return CPLNet(resolve_config(arch, input_shape, num_classes, **overrides))


def float64_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float64 copy of ``model`` computing the same function (unfrozen layers keep today's step).

    Parameters and buffers are converted straight into the copy (no float32 copy first: half the
    memory traffic of ``deepcopy(model).double()`` on a 41M-parameter model).
    """
    # An unfrozen layer's step (CPL) or rescaling (SLL) is whatever its float32 estimate gives now: take it
    # from the original.
    with torch.no_grad():
        scales = {name: layer.current_scale().detach().clone() for name, layer in cpl_layers(model) if not layer.frozen}
    memo = {id(t): t.detach().double() if t.is_floating_point() else t.detach().clone() for t in [*model.parameters(), *model.buffers()]}
    exact = copy.deepcopy(model, memo)
    for name, layer in cpl_layers(exact):
        if name in scales:
            layer.set_frozen_scale(scales[name])
    return exact.eval()


def weights_key(model: nn.Module) -> tuple[object, ...]:
    """Changes whenever a parameter or buffer of ``model`` is replaced or modified in place, or a CPL or
    SLL layer is frozen or unfrozen: the key of caches of anything computed from the weights."""
    tensors = [*model.parameters(), *model.buffers()]
    flags = tuple(layer.frozen for _, layer in cpl_layers(model))
    return (tuple((t.data_ptr(), t._version, t.dtype, str(t.device)) for t in tensors), flags)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
