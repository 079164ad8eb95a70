"""The one image reader of cpl-cert (``predict`` and ``folder:PATH`` datasets), with one policy.

Pixels are read at their true values, ``value / (2^depth - 1)``: PNG at every bit depth (1, 2, 4, 8,
16) and colour type by cpl-cert's own decoder (``cpl_cert.png``), other formats (JPEG, BMP, ...) by
Pillow as 8-bit grey or RGB. Depths up to 8 bits come back as uint8 (``value * 255 / (2^depth - 1)``
is a whole number, so ``/ 255`` gives the true value), 16-bit ones as float64 ``value / 65535``.

Nothing is converted silently. An alpha channel (grey+alpha, RGBA, or a tRNS chunk: palette or key
transparency) is refused, and so is an image whose channels differ from what the caller needs (grey
for an RGB model, RGB for a grey one). With ``convert=True`` (``--convert``) only conversions that
lose nothing are made: an alpha channel that is opaque at every pixel is dropped, grey is copied into
R, G and B, and RGB whose three channels are equal at every pixel becomes grey; anything else is
still refused, with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CplCertError
from .png import decode_png

PILLOW_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA")
"""Pillow modes read from formats other than PNG (all 8-bit); others (CMYK, 16/32-bit, float) are refused."""


@dataclass
class Decoded:
    """An image's stored values: ``colour`` (H, W, 1 or 3), ``alpha`` (H, W) or None, on the scale 0..``maximum``."""

    colour: np.ndarray
    alpha: np.ndarray | None
    maximum: int
    kind: str


def _key_alpha(colour: np.ndarray, trns: bytes, channels: int, name: str) -> np.ndarray:
    """The alpha of a grey or RGB PNG with a tRNS key: 0 where the pixel equals the key, opaque elsewhere."""
    if len(trns) != 2 * channels:
        raise CplCertError(f"{name} is a damaged PNG file (its tRNS chunk has {len(trns)} bytes)")
    key = np.frombuffer(trns, ">u2").astype(np.int64)
    return np.where((colour.astype(np.int64) == key).all(axis=2), 0, 1)


def _from_png(data: bytes, name: str) -> Decoded:
    """A PNG's true values: samples of grey / RGB with alpha split off, palette indices looked up."""
    png = decode_png(data, name)
    depth, colour_type, samples, trns = png.depth, png.colour_type, png.samples, png.transparency
    kind = f"{depth}-bit {['grey', '', 'RGB', 'palette', 'grey+alpha', '', 'RGBA'][colour_type]} PNG"
    maximum = (1 << depth) - 1
    if colour_type == 3:
        assert png.palette is not None
        index = samples[..., 0]
        alpha = None
        if trns is not None:
            if len(trns) > len(png.palette):
                raise CplCertError(f"{name} is a damaged PNG file (its tRNS chunk has more entries than its palette)")
            table = np.full(len(png.palette), 255, np.uint8)
            table[: len(trns)] = np.frombuffer(trns, np.uint8)
            alpha = table[index]
        return Decoded(png.palette[index], alpha, 255, kind if trns is None else kind + " with transparency (tRNS)")
    if colour_type in (4, 6):
        return Decoded(samples[..., :-1], samples[..., -1], maximum, kind)
    channels = samples.shape[2]
    if trns is None:
        return Decoded(samples, None, maximum, kind)
    return Decoded(samples, _key_alpha(samples, trns, channels, name) * maximum, maximum, kind + " with a transparent colour (tRNS)")


def _from_pillow(path: Path) -> Decoded:
    """Any other format through Pillow, as 8-bit grey or RGB (and alpha when it has transparency)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode, kind = image.mode, f"{image.format or 'image'} of mode {image.mode}"
        if mode not in PILLOW_MODES:
            raise CplCertError(f"{path} is a {kind}, which cpl-cert does not read; save it as a PNG (any bit depth) or as 8-bit grey or RGB")
        transparent = "transparency" in image.info
        if mode == "1":
            image = image.convert("LA" if transparent else "L")
        elif mode in ("P", "PA"):
            image = image.convert("RGBA" if transparent or mode == "PA" else "RGB")
        elif transparent and mode in ("L", "RGB"):
            image = image.convert("LA" if mode == "L" else "RGBA")
        pixels = np.array(image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    has_alpha = pixels.shape[2] in (2, 4)
    return Decoded(pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1], pixels[..., -1] if has_alpha else None, 255, kind)


def _decode(path: Path) -> Decoded:
    """The file's stored values, PNG by signature (whatever its name), anything else through Pillow."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CplCertError(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if data.startswith(b"\x89PNG"):
        return _from_png(data, str(path))
    from PIL import Image

    try:
        return _from_pillow(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CplCertError(f"{path} is not a readable image ({reason})") from None


def _without_alpha(image: Decoded, name: str, convert: bool, how: str) -> np.ndarray:
    """The colour samples; an alpha channel is refused, or dropped when asked and opaque everywhere."""
    if image.alpha is None:
        return image.colour
    if not convert:
        raise CplCertError(
            f"{name} has an alpha channel ({image.kind}); save it without transparency, "
            f"or use {how} to drop an alpha channel that is opaque everywhere"
        )
    if (image.alpha != image.maximum).any():
        raise CplCertError(f"{name} has transparent pixels; flatten it onto the background you mean, then save it without an alpha channel")
    return image.colour


def _true_values(colour: np.ndarray, maximum: int) -> torch.Tensor:
    """(H, W, C) samples to (C, H, W): uint8 ``value * 255 / maximum`` for depths up to 8, else float64 ``value / maximum``."""
    chw = np.ascontiguousarray(colour.transpose(2, 0, 1))
    if maximum == 65535:
        return torch.from_numpy(chw.astype(np.float64) / 65535.0)
    return torch.from_numpy((chw.astype(np.uint16) * (255 // maximum)).astype(np.uint8))


def read_image(path: str | Path, convert: bool = False, how: str = "convert=True") -> torch.Tensor:
    """One image file as (C, H, W) with C = 1 (grey) or 3 (RGB), at its true values (see the module docstring).

    ``how`` names the switch that asks for conversion, for the message that refuses an alpha channel.
    """
    path = Path(path)
    image = _decode(path)
    return _true_values(_without_alpha(image, str(path), convert, how), image.maximum)


def describe_channels(channels: int) -> str:
    return {1: "grey (1 channel)", 3: "RGB (3 channels)"}.get(channels, f"{channels}-channel")


def match_channels(image: torch.Tensor, channels: int, name: str, convert: bool = False, how: str = "convert=True") -> torch.Tensor:
    """``image`` (C, H, W) with ``channels`` channels: refused when they differ, unless ``convert`` asks for a
    conversion that loses nothing (grey copied into R, G and B; RGB with equal channels to grey)."""
    have = int(image.shape[0])
    if have == channels:
        return image
    differ = f"{name} is {describe_channels(have)} but the model takes {describe_channels(channels)} images"
    if have == 1 and channels == 3:
        if not convert:
            raise CplCertError(f"{differ}; save it as RGB, or use {how} to copy the grey channel into R, G and B")
        return image.expand(3, -1, -1).clone()
    if have == 3 and channels == 1:
        if not convert:
            raise CplCertError(f"{differ}; save it as grey, or use {how} if its R, G and B are equal at every pixel")
        if not (torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])):
            raise CplCertError(f"{differ}; its R, G and B differ, so convert it to grey yourself (the weights of R, G and B are yours to choose)")
        return image[:1].clone()
    raise CplCertError(differ)
