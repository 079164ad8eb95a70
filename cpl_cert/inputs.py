"""New inputs for a model: PNG/JPEG files, folders of them and ``.npy`` arrays, checked against its input.

Images are read by ``cpl_cert.images`` (the reader ``folder:PATH`` datasets use too) at their true
values: uint8 for depths up to 8 bits (the model divides by 255, as for its training data), float64
in [0, 1] for 16-bit PNGs; float arrays become float64. Nothing is converted silently: an alpha
channel, a grey image for an RGB model (or the reverse) or a wrong size is refused with one sentence;
channels change only when the caller asks (``convert=True``, lossless conversions only), sizes only
with ``resize=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import CplCertError
from .images import describe_channels, match_channels, read_image
from .progress import OnProgress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy",)
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclass
class Inputs:
    """Images ready for a model: ``images`` (N, C, H, W), uint8 or float64 in [0, 1], and a name for each."""

    names: list[str]
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the image and ``.npy`` files directly inside each folder (sorted by name)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
            if not found:
                raise CplCertError(f"the folder {path} holds no .png, .jpg, .jpeg or .npy files")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES + ARRAY_SUFFIXES:
                raise CplCertError(f"{path} is not a .png, .jpg, .jpeg or .npy file")
            files.append(path)
        else:
            raise CplCertError(f"{path} does not exist")
    if not files:
        raise CplCertError("give at least one image, folder or .npy file")
    return files


def read_array(path: Path) -> torch.Tensor:
    """A ``.npy`` file as (N, C, H, W): (H, W), (C, H, W) or (N, C, H, W); uint8 0-255 or float in [0, 1]."""
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        reason = "it holds Python objects, which cpl-cert does not unpickle" if "allow_pickle" in str(exc) else "not a valid .npy file"
        raise CplCertError(f"{path} cannot be read ({reason})") from None
    except (OSError, EOFError) as exc:
        raise CplCertError(f"{path} is not a readable .npy file ({type(exc).__name__})") from None
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3, 4):
        raise CplCertError(f"{path} holds an array of shape {getattr(array, 'shape', '?')}; give (H, W), (C, H, W) or (N, C, H, W)")
    array = array.reshape((1,) * (4 - array.ndim) + array.shape)
    if array.shape[0] == 0:
        raise CplCertError(f"{path} holds no images (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if array.dtype not in FLOAT_DTYPES:
        raise CplCertError(f"{path} holds {array.dtype} values; give uint8 pixels (0-255) or floats in [0, 1]")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise CplCertError(f"{path} holds NaN or infinite values")
    if values.min() < 0 or values.max() > 1:
        raise CplCertError(
            f"{path} holds floats outside [0, 1] (from {values.min():g} to {values.max():g}); "
            "scale pixels to [0, 1] or save them as uint8"
        )
    return torch.from_numpy(values)


def fit(images: torch.Tensor, name: str, input_shape: tuple[int, int, int], resize: bool) -> torch.Tensor:
    """``images`` (N, C, H, W) checked against ``input_shape``; resized to it when ``resize`` is set."""
    c, h, w = input_shape
    if images.shape[1] != c:
        hint = "; the array looks channels-last: save it as (N, C, H, W)" if tuple(images.shape[-3:]) == (h, w, c) else ""
        raise CplCertError(f"{name} is {describe_channels(images.shape[1])} but the model takes {describe_channels(c)} images{hint}")
    if tuple(images.shape[2:]) == (h, w):
        return images
    if not resize:
        raise CplCertError(f"{name} is {images.shape[3]}x{images.shape[2]} but the model takes {w}x{h} images; pass --resize to resize it")
    from torchvision.transforms.v2.functional import resize as resize_images

    if images.dtype == torch.uint8:
        return resize_images(images, [h, w], antialias=True)
    return resize_images(images.float(), [h, w], antialias=True).double().clamp_(0.0, 1.0)


def load_inputs(
    paths: Sequence[str | Path],
    input_shape: tuple[int, int, int],
    resize: bool = False,
    on_progress: OnProgress | None = None,
    convert: bool = False,
    how: str = "convert=True",
) -> Inputs:
    """Read every file (folders expanded), check each against ``input_shape``, stack them in order.

    The result is uint8 when every input is 8-bit, else float64 in [0, 1] (uint8 divided by 255).
    ``convert`` allows the lossless conversions of ``cpl_cert.images`` (``how`` names that switch in
    messages). ``on_progress("reading", done, total)`` is called after each file.
    """
    files = expand_paths(paths)
    names: list[str] = []
    parts: list[torch.Tensor] = []
    for done, path in enumerate(files, start=1):
        if path.suffix.lower() in ARRAY_SUFFIXES:
            batch = read_array(path)
            labels = [str(path)] if batch.shape[0] == 1 else [f"{path}[{i}]" for i in range(batch.shape[0])]
        else:
            image = match_channels(read_image(path, convert, how), input_shape[0], str(path), convert, how)
            batch, labels = image[None], [str(path)]
        parts.append(fit(batch, str(path), input_shape, resize))
        names.extend(labels)
        if on_progress is not None:
            on_progress("reading", done, len(files))
    if all(part.dtype == torch.uint8 for part in parts):
        return Inputs(names, torch.cat(parts))
    return Inputs(names, torch.cat([part.double() / 255.0 if part.dtype == torch.uint8 else part for part in parts]))
