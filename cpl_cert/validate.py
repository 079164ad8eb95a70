"""Semantic checks of a model's tensors: what a valid CPL network must satisfy before anything is certified.

A checkpoint can be edited (safetensors is a plain format), and a model in memory can be changed by
code; neither may yield a certificate. ``validate_model`` refuses, with one sentence, every tensor
value for which the bounds of docs/math.md do not hold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import CplCertError
from .layers import CPL_LAYER_TYPES, SLL_LAYER_TYPES, InputNormalization


def validate_model(model: nn.Module, source: str = "the model") -> None:
    """Raise ``CplCertError`` unless every tensor is finite, every std positive, every step and SLL
    rescaling >= 0 and every power-iteration vector non-zero."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CplCertError(f"{source}: tensor {name} contains NaN or infinite values")
        for name, module in model.named_modules():
            _check_module(name, module, source)


def _check_module(name: str, module: nn.Module, source: str) -> None:
    if isinstance(module, InputNormalization) and not bool((module.std > 0).all()):
        raise CplCertError(f"{source}: {name}.std must be positive in every channel (a negative or zero std has no valid bound)")
    if isinstance(module, CPL_LAYER_TYPES):
        if float(module.step) < 0:
            raise CplCertError(f"{source}: {name}.step is negative ({float(module.step):g}); a CPL step must be >= 0")
    if isinstance(module, SLL_LAYER_TYPES) and not bool((module.t >= 0).all()):
        raise CplCertError(f"{source}: {name}.t has a negative entry; an SLL rescaling must be >= 0")
    if isinstance(module, CPL_LAYER_TYPES + SLL_LAYER_TYPES) and float(module.u.detach().double().norm()) == 0.0:
        raise CplCertError(f"{source}: {name}.u (the power-iteration vector) is zero")


def validate_against_metadata(model: nn.Module, meta: dict[str, Any], source: str) -> None:
    """Raise ``CplCertError`` unless the normalisation tensors equal the config's values and the
    ``dataset`` metadata describes the same input shape and number of classes as the config."""
    config = model.config
    expected_std = config.std if config.std is not None else (1.0,) * len(config.mean)
    for name, values in (("mean", config.mean), ("std", expected_std)):
        stored = getattr(model.normalize, name).detach().flatten()
        if not torch.equal(stored, torch.tensor(values, dtype=stored.dtype)):
            raise CplCertError(f"{source}: tensor normalize.{name} {stored.tolist()} differs from the config's {name} {list(values)}")
    dataset = meta.get("dataset")
    if not isinstance(dataset, dict):
        raise CplCertError(f"{source}: the dataset metadata must be a JSON object")
    shape, classes = dataset.get("input_shape"), dataset.get("num_classes")
    if shape is not None and tuple(shape) != tuple(config.input_shape):
        raise CplCertError(f"{source}: the dataset metadata says input shape {tuple(shape)}, the config {tuple(config.input_shape)}")
    if classes is not None and classes != config.num_classes:
        raise CplCertError(f"{source}: the dataset metadata says {classes} classes, the config {config.num_classes}")
    names = dataset.get("classes")
    if names is not None and len(names) != config.num_classes:
        raise CplCertError(f"{source}: the dataset metadata names {len(names)} classes, the config has {config.num_classes}")
    for name in ("mean", "std"):
        values = dataset.get(name)
        if values is not None and len(values) != config.input_shape[0]:
            raise CplCertError(f"{source}: the dataset metadata's {name} has {len(values)} values, the images have {config.input_shape[0]} channels")
