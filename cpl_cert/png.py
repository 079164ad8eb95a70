"""A PNG decoder (PNG specification, ISO/IEC 15948): every bit depth and colour type, filters, Adam7.

Pillow opens 16-bit RGB, RGBA and grey+alpha PNGs as 8-bit (it keeps the high byte), so cpl-cert reads
PNG itself: the chunks (CRCs checked), zlib (the standard library), the five row filters and the
Adam7 interlace. The result is the stored samples, unscaled; ``cpl_cert.images`` gives them meaning.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import CplCertError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each colour type: grey, RGB, palette index, grey+alpha, RGBA."""
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
"""The seven passes of Adam7: (first row, first column, row step, column step)."""
MAX_PIXELS = 1 << 28


@dataclass
class PNG:
    """A decoded PNG: ``samples`` (H, W, channels) as stored (uint8, or uint16 at depth 16; palette indices
    for colour type 3), the ``palette`` (N, 3) uint8 and the raw ``transparency`` (tRNS) chunk."""

    depth: int
    colour_type: int
    interlaced: bool
    samples: np.ndarray
    palette: np.ndarray | None = None
    transparency: bytes | None = None


def _chunks(data: bytes, name: str) -> list[tuple[bytes, bytes]]:
    """The (type, payload) chunks up to IEND, every CRC checked."""
    if not data.startswith(SIGNATURE):
        raise CplCertError(f"{name} is not a PNG file (no PNG signature)")
    chunks, pos = [], len(SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise CplCertError(f"{name} is a truncated PNG file (it ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise CplCertError(f"{name} is a truncated PNG file (chunk {kind!r} runs past the end)")
        payload = data[pos + 8 : end]
        if zlib.crc32(kind + payload) != struct.unpack(">I", data[end : end + 4])[0]:
            raise CplCertError(f"{name} is a damaged PNG file (chunk {kind.decode('latin-1')} fails its CRC check)")
        chunks.append((kind, payload))
        if kind == b"IEND":
            return chunks
        pos = end + 4


def _header(payload: bytes, name: str) -> tuple[int, int, int, int, bool]:
    """Width, height, bit depth, colour type and interlace of an IHDR chunk, each checked."""
    if len(payload) != 13:
        raise CplCertError(f"{name} is a damaged PNG file (its IHDR chunk has {len(payload)} bytes, not 13)")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", payload)
    if colour not in DEPTHS or depth not in DEPTHS[colour]:
        raise CplCertError(f"{name} is not a valid PNG file (bit depth {depth} with colour type {colour})")
    if compression != 0 or filtering != 0 or interlace not in (0, 1):
        raise CplCertError(f"{name} uses a PNG compression, filter or interlace method that does not exist")
    if not (0 < width and 0 < height and width * height <= MAX_PIXELS):
        raise CplCertError(f"{name} has an unusable size {width}x{height}")
    return width, height, depth, colour, bool(interlace)


def _passes(width: int, height: int, interlaced: bool) -> list[tuple[int, int, int, int, int, int]]:
    """(first row, first column, row step, column step, rows, columns) of each non-empty pass."""
    layout = ADAM7 if interlaced else ((0, 0, 1, 1),)
    passes = []
    for r0, c0, dr, dc in layout:
        rows, cols = (height - r0 + dr - 1) // dr, (width - c0 + dc - 1) // dc
        if rows > 0 and cols > 0:
            passes.append((r0, c0, dr, dc, rows, cols))
    return passes


def _average(row: list[int], prior: list[int], bpp: int) -> None:
    """Average filter: add the floor of the mean of the byte to the left and the byte above (in place)."""
    for i in range(bpp):
        row[i] = (row[i] + (prior[i] >> 1)) & 0xFF
    for i in range(bpp, len(row)):
        row[i] = (row[i] + ((row[i - bpp] + prior[i]) >> 1)) & 0xFF


def _paeth(row: list[int], prior: list[int], bpp: int) -> None:
    """Paeth filter (spec section 9.4): add whichever of left (a), above (b), above-left (c) is nearest
    to a + b - c, ties going to a, then b (in place). |p - a| = |b - c|, |p - b| = |a - c|, |p - c| = |a + b - 2c|."""
    for i in range(bpp):
        row[i] = (row[i] + prior[i]) & 0xFF  # a = c = 0: the predictor is b
    for i in range(bpp, len(row)):
        a, b, c = row[i - bpp], prior[i], prior[i - bpp]
        pa, pb = b - c, a - c
        pc = pa + pb
        pa, pb, pc = abs(pa), abs(pb), abs(pc)
        row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF


def _unfilter_row(kind: int, filtered: bytes, prior: bytes, bpp: int) -> bytes:
    """One row with its filter undone (``prior``: the previous unfiltered row of the pass, zeros for the first)."""
    if kind == 0:
        return filtered
    if kind == 1:  # Sub: a running sum (mod 256) over the bytes bpp apart
        return np.cumsum(np.frombuffer(filtered, np.uint8).reshape(-1, bpp), axis=0, dtype=np.uint8).tobytes()
    if kind == 2:  # Up
        return (np.frombuffer(filtered, np.uint8) + np.frombuffer(prior, np.uint8)).tobytes()
    if kind not in (3, 4):
        raise ValueError(f"filter type {kind}")
    row = list(filtered)
    (_average if kind == 3 else _paeth)(row, list(prior), bpp)
    return bytes(row)


def _unpack(rows: bytes, height: int, width: int, channels: int, depth: int) -> np.ndarray:
    """Unfiltered rows to (height, width, channels) samples: big-endian 16-bit, or sub-byte samples MSB first."""
    if depth == 16:
        return np.frombuffer(rows, ">u2").reshape(height, width, channels).astype(np.uint16)
    raw = np.frombuffer(rows, np.uint8).reshape(height, -1)
    if depth == 8:
        return raw.reshape(height, width, channels).copy()
    bits = np.unpackbits(raw, axis=1).reshape(height, -1, depth)[:, : width * channels]
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint8).reshape(height, width, channels)


def _decode_pass(stream: memoryview, rows: int, cols: int, channels: int, depth: int, name: str) -> np.ndarray:
    """One pass (or the whole image) from its filtered bytes."""
    stride = (cols * channels * depth + 7) // 8
    bpp = max(1, channels * depth // 8)
    out, prior = bytearray(), bytes(stride)
    for r in range(rows):
        line = stream[r * (stride + 1) : (r + 1) * (stride + 1)]
        try:
            prior = _unfilter_row(line[0], bytes(line[1:]), prior, bpp)
        except ValueError:
            raise CplCertError(f"{name} is a damaged PNG file (row filter type {line[0]} does not exist)") from None
        out += prior
    return _unpack(bytes(out), rows, cols, channels, depth)


def _inflate(idat: bytes, size: int, name: str) -> memoryview:
    """The zlib stream, which must hold exactly ``size`` bytes (no more is ever decompressed)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(idat, size + 1)
    except zlib.error as exc:
        raise CplCertError(f"{name} is a damaged PNG file (its image data cannot be decompressed: {exc})") from None
    if len(data) != size:
        raise CplCertError(f"{name} is a damaged PNG file (its image data holds {len(data)} bytes, its header needs {size})")
    return memoryview(data)


def decode_png(data: bytes, name: str) -> PNG:
    """Decode a PNG file's bytes; ``name`` is used in the one-sentence errors."""
    chunks = _chunks(data, name)
    if chunks[0][0] != b"IHDR":
        raise CplCertError(f"{name} is a damaged PNG file (it does not start with an IHDR chunk)")
    width, height, depth, colour, interlaced = _header(chunks[0][1], name)
    found = {kind: payload for kind, payload in chunks}
    unknown = sorted({kind.decode("latin-1") for kind, _ in chunks if kind[:1].isupper() and kind not in (b"IHDR", b"PLTE", b"IDAT", b"IEND")})
    if unknown:
        raise CplCertError(f"{name} holds a critical PNG chunk cpl-cert does not know ({unknown[0]})")
    if b"IDAT" not in found:
        raise CplCertError(f"{name} is a damaged PNG file (it has no image data)")
    channels = CHANNELS[colour]
    passes = _passes(width, height, interlaced)
    sizes = [rows * (1 + (cols * channels * depth + 7) // 8) for *_, rows, cols in passes]
    stream = _inflate(b"".join(payload for kind, payload in chunks if kind == b"IDAT"), sum(sizes), name)
    samples = np.zeros((height, width, channels), np.uint16 if depth == 16 else np.uint8)
    offset = 0
    for (r0, c0, dr, dc, rows, cols), size in zip(passes, sizes, strict=True):
        samples[r0::dr, c0::dc] = _decode_pass(stream[offset : offset + size], rows, cols, channels, depth, name)
        offset += size
    palette = _palette(found.get(b"PLTE"), colour, name)
    if palette is not None and colour == 3 and int(samples.max()) >= len(palette):
        raise CplCertError(f"{name} is a damaged PNG file (a pixel uses palette entry {int(samples.max())} of {len(palette)})")
    return PNG(depth, colour, interlaced, samples, palette, found.get(b"tRNS"))


def _palette(payload: bytes | None, colour: int, name: str) -> np.ndarray | None:
    """The PLTE entries as (N, 3) uint8; required for colour type 3."""
    if payload is None:
        if colour == 3:
            raise CplCertError(f"{name} is a damaged PNG file (a palette image without a PLTE chunk)")
        return None
    if len(payload) % 3 or not 0 < len(payload) <= 768:
        raise CplCertError(f"{name} is a damaged PNG file (its PLTE chunk has {len(payload)} bytes)")
    return np.frombuffer(payload, np.uint8).reshape(-1, 3)
