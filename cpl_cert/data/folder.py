"""ImageFolder trees (``PATH/<class>/<image>`` or ``PATH/<split>/<class>/<image>``) as one tensor.

Images are read by ``cpl_cert.images``, the reader ``predict`` uses, with its policy: true values
(uint8, or float64 for 16-bit PNGs), alpha channels refused, nothing converted unless asked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CplCertError
from ..images import describe_channels, read_image
from .dataset import ImageDataset
from .registry import CIFAR_EPS, MNIST_EPS

HOW = "convert=True (cpl_cert.load_dataset)"
"""How a caller asks for the lossless conversions, named in the messages that refuse an image."""


def _read_images(files: list[str], convert: bool, root: Path) -> torch.Tensor:
    """The images as ``(N, C, H, W)``, read by ``cpl_cert.images`` at their true values: uint8 when every file
    has at most 8 bits per sample, else float64 in [0, 1]. One size and one channel count for all (with
    ``convert``, grey images among RGB ones are copied into R, G and B)."""
    tensors = [read_image(file, convert, how=HOW) for file in files]
    channels = 3 if convert and any(t.shape[0] == 3 for t in tensors) else int(tensors[0].shape[0])
    for file, tensor in zip(files, tensors, strict=True):
        if tensor.shape[0] != channels and not convert:
            raise CplCertError(
                f"{file} is {describe_channels(int(tensor.shape[0]))} but {files[0]} is {describe_channels(channels)}; "
                f"save every image with the same channels, or use {HOW} to copy grey images into R, G and B"
            )
    tensors = [t.expand(channels, -1, -1) if t.shape[0] != channels else t for t in tensors]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CplCertError(f"the images under {root} do not all have the same size: {sorted(shapes)[:3]}")
    if all(t.dtype == torch.uint8 for t in tensors):
        return torch.stack(tensors)
    return torch.stack([t.double() / 255.0 if t.dtype == torch.uint8 else t for t in tensors])


def _statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels in [0, 1] (std at least 1e-3)."""
    x = images.double() / 255 if images.dtype == torch.uint8 else images.double()
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
    return mean, std


def load_folder(path: Path, split: str, convert: bool = False) -> ImageDataset:
    """An ImageFolder tree; ``PATH/<split>/`` is used when it exists. Classes are the sorted folder names.

    ``convert`` allows the lossless conversions of ``cpl_cert.images`` (opaque alpha dropped, grey to RGB).
    """
    import torchvision.datasets as tvd

    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise CplCertError(f"the image folder {path} does not exist")
    try:
        tree = tvd.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CplCertError(f"{root} is not an image folder tree ({str(exc).splitlines()[0]})") from None
    images = _read_images([file for file, _ in tree.samples], convert, root)
    labels = torch.tensor([label for _, label in tree.samples], dtype=torch.long)
    mean, std = _statistics(images)
    eps = CIFAR_EPS if images.shape[1] == 3 else MNIST_EPS
    return ImageDataset(f"folder:{path}", split, images, labels, tuple(tree.classes), mean, std, f"folder: {root}", eps)
