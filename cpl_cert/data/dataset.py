"""The in-memory dataset: images ``(N, C, H, W)`` (uint8, or float64 in [0, 1]) and int64 labels, with what a checkpoint records."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import CplCertError
from .registry import MNIST_EPS


@dataclass
class ImageDataset:
    """A split held in memory: ``images`` ``(N, C, H, W)``, uint8 (value / 255) or, for a folder of 16-bit PNGs,
    float64 in [0, 1]; ``labels`` int64 ``(N,)``."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    default_eps: tuple[str, ...] = MNIST_EPS
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, limit: int | None) -> ImageDataset:
        """The first ``limit`` points (all when ``None``)."""
        if limit is None:
            return self
        check_limit(limit)
        return replace(self, images=self.images[:limit], labels=self.labels[:limit])

    def metadata(self) -> dict[str, Any]:
        """The ``dataset`` entry of a checkpoint's metadata."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def check_limit(limit: int | None) -> None:
    """Refuse a limit below one point (``None``: no limit), before any data is read."""
    if limit is not None and limit < 1:
        raise CplCertError(f"--limit must be a positive number of points, got {limit}")


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1]; floating-point images (already in [0, 1]) pass through as float32.

    Other integer types are refused: without the division by 255, radii would come out in pixel units.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise CplCertError(
        f"images of type {str(images.dtype).replace('torch.', '')} are not understood; "
        "pass uint8 pixels (0-255) or floating-point pixels in [0, 1]"
    )


def check_compatible(dataset: ImageDataset, model_input_shape: tuple[int, ...], model_classes: int) -> None:
    """Fail with one sentence if the data do not fit the model."""
    if tuple(dataset.input_shape) != tuple(model_input_shape):
        raise CplCertError(
            f"the {dataset.name} images have shape {tuple(dataset.input_shape)} but the model expects {tuple(model_input_shape)}"
        )
    if dataset.num_classes != model_classes:
        raise CplCertError(f"{dataset.name} has {dataset.num_classes} classes but the model predicts {model_classes}")
