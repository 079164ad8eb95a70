"""ImageFolder trees (``PATH/<class>/<image>`` or ``PATH/<split>/<class>/<image>``) as one uint8 tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CplCertError
from .dataset import ImageDataset
from .registry import CIFAR_EPS, MNIST_EPS

GREY_MODES = ("1", "L", "I", "I;16")
"""PIL modes read as one grey channel (ImageFolder's default loader would make them RGB)."""


def _read_images(files: list[str]) -> torch.Tensor:
    """The images as ``(N, C, H, W)`` uint8: grey ones with one channel, the rest as RGB; one size for all."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    tensors = []
    for file in files:
        with Image.open(file) as image:
            tensors.append(pil_to_tensor(image.convert("L" if image.mode in GREY_MODES else "RGB")))
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CplCertError(f"the images do not all have the same size and channels: {sorted(shapes)[:3]}")
    return torch.stack(tensors)


def _statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels in [0, 1] (std at least 1e-3)."""
    x = images.double() / 255
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
    return mean, std


def load_folder(path: Path, split: str) -> ImageDataset:
    """An ImageFolder tree; ``PATH/<split>/`` is used when it exists. Classes are the sorted folder names."""
    import torchvision.datasets as tvd

    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise CplCertError(f"the image folder {path} does not exist")
    try:
        tree = tvd.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CplCertError(f"{root} is not an image folder tree ({str(exc).splitlines()[0]})") from None
    try:
        images = _read_images([file for file, _ in tree.samples])
    except CplCertError as exc:
        raise CplCertError(f"under {root}, {exc}") from None
    except OSError as exc:
        raise CplCertError(f"an image under {root} is unreadable ({exc})") from None
    labels = torch.tensor([label for _, label in tree.samples], dtype=torch.long)
    mean, std = _statistics(images)
    eps = CIFAR_EPS if images.shape[1] == 3 else MNIST_EPS
    return ImageDataset(f"folder:{path}", split, images, labels, tuple(tree.classes), mean, std, f"folder: {root}", eps)
