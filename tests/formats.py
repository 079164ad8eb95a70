"""Writers for the dataset file formats, written from their specifications (not with cpl-cert's readers).

Pixel values come from ``pixel(n, c, r, col)``, different for every image, channel, row and column
in the small sizes used here, so a reader that swaps axes or mixes images up cannot pass.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
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


# --- PNG, written from the PNG specification (ISO/IEC 15948, W3C PNG 2nd edition) -------------------------
PNG_SIGNATURE = bytes([137, 80, 78, 71, 13, 10, 26, 10])
ADAM7_PASSES = [  # (starting row, starting column, row increment, column increment), spec section 8.2
    (0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1),
]
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def crc32(data: bytes) -> int:
    """The CRC of spec annex D: polynomial 0xEDB88320, register preset to all ones, result inverted."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xEDB88320 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """Length (4 bytes, big-endian), type, data, CRC over type and data."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc32(kind + payload))


def pack_row(pixels: list[tuple[int, ...]], depth: int) -> bytes:
    """One scanline's samples, left to right: 16-bit big-endian, 8-bit bytes, or smaller samples packed
    from the most significant bit, the last byte padded with zero bits."""
    samples = [s for pixel in pixels for s in pixel]
    if depth == 16:
        return b"".join(bytes([s >> 8, s & 0xFF]) for s in samples)
    if depth == 8:
        return bytes(samples)
    bits = "".join(format(s, f"0{depth}b") for s in samples)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def _predictor(kind: int, a: int, b: int, c: int) -> int:
    """What filter ``kind`` subtracts, from the bytes to the left (a), above (b) and above-left (c)."""
    if kind == 0:
        return 0
    if kind == 1:
        return a
    if kind == 2:
        return b
    if kind == 3:
        return (a + b) // 2
    p = a + b - c  # Paeth, spec section 9.4
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_rows(rows: list[bytes], bpp: int, filters: list[int]) -> bytes:
    """Each scanline prefixed by its filter type, filtered against the unfiltered scanline above."""
    out = b""
    prior = bytes(len(rows[0])) if rows else b""
    for r, row in enumerate(rows):
        kind = filters[r % len(filters)]
        filtered = bytes(
            (row[i] - _predictor(kind, row[i - bpp] if i >= bpp else 0, prior[i], prior[i - bpp] if i >= bpp else 0)) % 256
            for i in range(len(row))
        )
        out += bytes([kind]) + filtered
        prior = row
    return out


def png_bytes(
    image: list[list[tuple[int, ...]]], depth: int, colour_type: int, palette: list[tuple[int, int, int]] | None = None,
    trns: bytes | None = None, interlace: bool = False, filters: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> bytes:
    """A PNG file of ``image`` (rows of pixels, each a tuple of samples), with the row filters cycling
    through ``filters`` and the compressed data split over two IDAT chunks."""
    height, width = len(image), len(image[0])
    bpp = max(1, PNG_CHANNELS[colour_type] * depth // 8)
    passes = ADAM7_PASSES if interlace else [(0, 0, 1, 1)]
    raw = b""
    for r0, c0, dr, dc in passes:
        sub = [row[c0::dc] for row in image[r0::dr]]
        if sub and sub[0]:  # empty passes are left out (spec section 8.2)
            raw += filter_rows([pack_row(row, depth) for row in sub], bpp, list(filters))
    data = zlib.compress(raw, 9)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlace))
    chunks = [png_chunk(b"IHDR", ihdr)]
    if palette is not None:
        chunks.append(png_chunk(b"PLTE", b"".join(bytes(entry) for entry in palette)))
    if trns is not None:
        chunks.append(png_chunk(b"tRNS", trns))
    half = len(data) // 2
    chunks += [png_chunk(b"IDAT", data[:half]), png_chunk(b"IDAT", data[half:]), png_chunk(b"IEND", b"")]
    return PNG_SIGNATURE + b"".join(chunks)


def sample(depth: int, n: int, c: int, r: int, col: int) -> int:
    """A sample value of ``depth`` bits that changes with each index (both bytes of a 16-bit sample)."""
    return (n * 40503 + c * 20011 + r * 4099 + col * 1031 + 100) % (1 << depth)
