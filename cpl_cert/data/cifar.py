"""A reader for CIFAR-10/100 in torchvision's layout (``cifar-10-batches-py``, ``cifar-100-python``).

Each batch file is a pickled dict: ``data`` is an ``N x 3072`` uint8 array whose rows hold the red,
then green, then blue 32 x 32 plane, and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100) the
classes. The unpickler only builds numpy arrays and plain containers, so a file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAFE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def read_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 from one pickled batch file."""
    with open(path, "rb") as handle:
        batch = _ArrayUnpickler(handle, encoding="latin1").load()
    if not isinstance(batch, dict):
        raise ValueError(f"{path.name} does not hold a CIFAR batch")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path.name} lacks 'data' or '{label_key}'")
    data = np.asarray(batch["data"])
    labels = torch.as_tensor(np.asarray(batch[label_key]), dtype=torch.long)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path.name} holds {data.dtype} data of shape {data.shape}, not N x 3072 bytes")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path.name} has {data.shape[0]} images but {labels.numel()} labels")
    return torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32), labels


def read_batches(folder: Path, names: tuple[str, ...], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batches ``names`` in ``folder``, concatenated in that order."""
    parts = [read_batch(folder / name, label_key) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
