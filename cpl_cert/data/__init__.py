"""Datasets by name, found offline first, held in memory as one uint8 tensor."""

from .resolve import SPECS, ImageDataset, check_compatible, load_dataset, to_float_images

__all__ = ["SPECS", "ImageDataset", "check_compatible", "load_dataset", "to_float_images"]
