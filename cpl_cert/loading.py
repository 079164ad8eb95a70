"""What ``certify`` and ``attack`` evaluate: a checkpoint and a split of its dataset, checked against each other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .data import ImageDataset, check_compatible, check_fits, load_dataset
from .data.dataset import check_limit
from .errors import CplCertError
from .models import CPLNet


@dataclass
class ModelAndData:
    """A frozen model, its checkpoint's metadata and the points to evaluate it on (the first ``limit`` of the split)."""

    model: CPLNet
    meta: dict[str, Any]
    data: ImageDataset
    available: int
    """Points of the whole split: a ``limit`` above it takes them all (the command line says so)."""


def load_model_and_data(
    model_path: str | os.PathLike[str],
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    device: str | torch.device = "cpu",
) -> ModelAndData:
    """The checkpoint, and its dataset split (``dataset``, or the one the checkpoint names) checked against it
    (by name before any file is read) and cut to the first ``limit`` points; every refusal is one sentence."""
    model, meta = load_checkpoint(model_path, device=device)
    name = dataset or (meta.get("dataset") or {}).get("name")
    if not name:
        raise CplCertError(f"{model_path} does not name its dataset; pass --dataset")
    check_fits(name, model.config.input_shape, model.config.num_classes)
    check_limit(limit)
    data = load_dataset(name, split=split, data_dir=data_dir)
    check_compatible(data, model.config.input_shape, model.config.num_classes)
    return ModelAndData(model, meta, data.subset(limit), len(data))
