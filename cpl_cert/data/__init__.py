"""Datasets by name, found offline first, held in memory as one tensor (uint8; float64 for 16-bit image folders).

``registry`` knows the names and shapes, ``idx`` and ``cifar`` read the file formats, ``folder``
reads ImageFolder trees and ``resolve`` decides where to look. The Fashion-MNIST test split ships in
``fashion-mnist/`` so that certification works offline out of the box.
"""

from .dataset import ImageDataset, check_compatible, to_float_images
from .registry import SPECS, DatasetSpec, check_fits, check_name, dataset_names
from .resolve import load_dataset

__all__ = [
    "SPECS", "DatasetSpec", "ImageDataset", "check_compatible", "check_fits", "check_name", "dataset_names", "load_dataset", "to_float_images",
]
