"""Data augmentation on the device, batched, on uint8 images (no host round trip, no per-sample loop).

Defaults: colour images (CIFAR) get reflect-pad 4 + random crop + horizontal flip (the paper's recipe);
single-channel 28x28 images (MNIST family) get zero-pad 2 + random crop and no flip (a digit or a
garment shifted by up to 2 pixels keeps its label; flipping would change some digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CplCertError

AUGMENTS = ("auto", "none", "crop", "crop-flip")


@dataclass(frozen=True)
class Augment:
    """Random crop after padding by ``pad`` (``mode`` 'reflect' or 'constant'), optional horizontal flip."""

    pad: int = 0
    mode: str = "constant"
    flip: bool = False

    def describe(self) -> str:
        if self.pad == 0 and not self.flip:
            return "none"
        crop = f"{self.mode}-pad {self.pad} + random crop" if self.pad else ""
        return " + ".join(p for p in (crop, "horizontal flip" if self.flip else "") if p)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a ``(B, C, H, W)`` batch (uint8, or float64 from 16-bit images) on its device; randomness from ``generator`` only."""
        b, c, h, w = images.shape
        out = images
        if self.pad:
            p = self.pad
            widened = self.mode == "reflect" and not out.is_floating_point()  # reflect padding needs floats; float64 stays float64
            padded = F.pad(out.float() if widened else out, (p, p, p, p), mode=self.mode)
            padded = padded.to(images.dtype)
            offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=images.device)
            rows = offsets[0][:, None] + torch.arange(h, device=images.device)  # (B, H)
            cols = offsets[1][:, None] + torch.arange(w, device=images.device)  # (B, W)
            out = padded[
                torch.arange(b, device=images.device)[:, None, None, None],
                torch.arange(c, device=images.device)[None, :, None, None],
                rows[:, None, :, None],
                cols[:, None, None, :],
            ]
        if self.flip:
            flip = torch.rand(b, generator=generator, device=images.device) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(3), out)
        return out


def make_augment(name: str, input_shape: tuple[int, int, int]) -> Augment:
    """The augmentation called ``name`` ('auto' picks by input shape, see the module docstring)."""
    if name not in AUGMENTS:
        raise CplCertError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTS)}")
    channels, height, _ = input_shape
    if name == "none":
        return Augment()
    colour = channels == 3 and height >= 32
    pad, mode = (4, "reflect") if colour else (2, "constant")
    if name == "auto":
        return Augment(pad, mode, flip=colour)
    return Augment(pad, mode, flip=(name == "crop-flip"))
