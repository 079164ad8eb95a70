"""Choosing the torch device: ``auto`` means CUDA when available, else the CPU."""

from __future__ import annotations

import torch

from .errors import CplCertError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """A ``torch.device`` from ``auto``/``cpu``/``cuda``/``cuda:N``, checked to exist (other device types are refused)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise CplCertError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        # MPS has no float64 (certification needs it); meta and the rest hold no data to compute on.
        raise CplCertError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CplCertError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CplCertError(f"device {name!r} does not exist (this machine has {torch.cuda.device_count()} GPUs)")
    return device
