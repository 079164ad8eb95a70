"""Writers for the dataset file formats, written from their specifications (not with cpl-cert's readers).

Pixel values come from ``pixel(n, c, r, col)``, different for every image, channel, row and column
in the small sizes used here, so a reader that swaps axes or mixes images up cannot pass.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def pixel(n: int, c: int, r: int, col: int) -> int:
    """A deterministic pixel value that changes with each index."""
    return (n * 37 + c * 101 + r * 7 + col * 3 + 5) % 256


def image(n: int, channels: int, height: int, width: int) -> list:
    """Image ``n`` as nested lists ``[c][r][col]`` of ``pixel`` values."""
    return [[[pixel(n, c, r, col) for col in range(width)] for r in range(height)] for c in range(channels)]


def expected(indices: range | list[int], channels: int, height: int, width: int) -> list:
    """Nested lists ``[i][c][r][col]``: the (N, C, H, W) array a reader must return for these images."""
    return [image(n, channels, height, width) for n in indices]


def idx_bytes(dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, number of dimensions, big-endian sizes, data."""
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_idx_split(
    folder: Path, prefix: str, images: list[bytes] | int, labels: list[int], size: tuple[int, int] = (28, 28), gz: bool = True
) -> None:
    """``<prefix>-images-idx3-ubyte[.gz]`` and ``<prefix>-labels-idx1-ubyte[.gz]`` in ``folder``.

    ``images`` is a list of raw row-major images, or a count (then the pixels come from ``pixel``).
    """
    height, width = size
    if isinstance(images, int):
        images = [bytes(pixel(i, 0, r, col) for r in range(height) for col in range(width)) for i in range(images)]
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        f"{prefix}-images-idx3-ubyte": idx_bytes((len(images), height, width), b"".join(images)),
        f"{prefix}-labels-idx1-ubyte": idx_bytes((len(labels),), bytes(labels)),
    }
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def cifar_rows(first: int, n: int) -> np.ndarray:
    """``n`` CIFAR rows (images ``first .. first+n-1``): 1024 red, then 1024 green, then 1024 blue bytes, each row-major."""
    rows = [[pixel(i, c, r, col) for c in range(3) for r in range(32) for col in range(32)] for i in range(first, first + n)]
    return np.array(rows, dtype=np.uint8)


def write_cifar_batch(path: Path, first: int, labels: list[int], label_key: str, extra: dict | None = None, bytes_keys: bool = False) -> None:
    """A pickled batch like torchvision's ``cifar-10-batches-py`` files (``bytes_keys``: keys as the
    Python 2 pickles hold them when read with ``encoding='bytes'``)."""
    batch = {"data": cifar_rows(first, len(labels)), label_key: labels, "batch_label": "testing batch", **(extra or {})}
    if bytes_keys:
        batch = {key.encode(): value for key, value in batch.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(batch, handle, protocol=2)


def write_image_folder(root: Path, classes: dict[str, int], size: tuple[int, int], mode: str) -> None:
    """``root/<class>/<k>.png`` with ``classes[name]`` images each; image k of the j-th class is
    ``pixel(n, ...)`` with n = 10 * j + k. ``mode`` is ``L`` (grey) or ``RGB``."""
    from PIL import Image

    height, width = size
    channels = 1 if mode == "L" else 3
    for j, (name, count) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            array = np.array(image(10 * j + k, channels, height, width), dtype=np.uint8)  # (C, H, W)
            Image.fromarray(array[0] if mode == "L" else array.transpose(1, 2, 0)).save(root / name / f"{k}.png")
