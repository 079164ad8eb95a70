"""A reader for IDX files (the MNIST family's format), gzipped or not, straight into a uint8 tensor."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

GZIP_MAGIC = b"\x1f\x8b"
UNSIGNED_BYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """The array in an IDX file of unsigned bytes, with the shape its header gives.

    Layout: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, each
    dimension as a big-endian 32-bit integer, then the data in row-major order.
    """
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise ValueError(f"{path.name} is not an IDX file")
    type_code, ndim = raw[2], raw[3]
    if type_code != UNSIGNED_BYTE:
        raise ValueError(f"{path.name} holds IDX type 0x{type_code:02x}, not unsigned bytes")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path.name} ends inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    if len(raw) - start != math.prod(shape):
        raise ValueError(f"{path.name} holds {len(raw) - start} bytes of data, its header announces {math.prod(shape)}")
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(shape)


def find_idx_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx_split(images_file: Path, labels_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64 from an images file and a labels file."""
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.dim() != 3 or labels.dim() != 1:
        raise ValueError(f"{images_file.name} must hold N x H x W images and {labels_file.name} N labels")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images.unsqueeze(1).contiguous(), labels.long()
