"""The training state a frozen checkpoint would lose, stored beside it under ``extra.`` and read back.

That is: the live (unfrozen) power-iteration vectors, the optimiser state, the torch RNG state and
the epoch / step / wall-time counters. Shuffling and augmentation are re-seeded every epoch, so with
these a resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import read_metadata
from ..errors import CplCertError
from ..models import ModelConfig
from .options import RESUME_KEYS


def resume_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, step: int, wall: float) -> dict[str, torch.Tensor]:
    """The training state that freezing would lose, as flat tensors for ``save_checkpoint(extra_tensors=)``."""
    tensors: dict[str, torch.Tensor] = {
        "resume.epoch": torch.tensor([epoch], dtype=torch.int64),
        "resume.step": torch.tensor([step], dtype=torch.int64),
        "resume.wall_seconds": torch.tensor([wall], dtype=torch.float64),
        "rng.torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    for name, buffer in model.named_buffers():
        tensors[f"live.{name}"] = buffer
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors


def _split_extra(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The checkpoint's weights and its ``extra.`` tensors (prefix removed), from one read of the file."""
    tensors = load_file(str(path))
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    if "resume.epoch" not in extra:
        raise CplCertError(f"{path} holds no resume state (it was not written by cpl-cert train, or was exported); start a new run")
    return weights, extra


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in extra.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    groups = optimizer.state_dict()["param_groups"]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CplCertError(f"the optimiser state in {path} does not fit this model ({exc})") from None


def restore_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int, float]:
    """Load weights, live buffers, optimiser and RNG state; returns (epoch, global step, wall seconds so far)."""
    weights, extra = _split_extra(path)
    state = dict(weights)
    for name, _ in model.named_buffers():
        if f"live.{name}" not in extra:
            raise CplCertError(f"{path} lacks the training state of {name}; it cannot be resumed")
        state[name] = extra[f"live.{name}"]
    model.load_state_dict(state)
    _load_optimizer(path, optimizer, extra)
    torch.set_rng_state(extra["rng.torch_cpu"])
    if "rng.cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng.cuda"])
    return int(extra["resume.epoch"][0]), int(extra["resume.step"][0]), float(extra["resume.wall_seconds"][0])


def check_resumable(path: Path, record: dict[str, Any], config: ModelConfig) -> None:
    """Refuse to resume ``path`` with a different architecture or different run-shaping options."""
    meta = read_metadata(path)
    stored = (meta.get("training") or {}).get("args")
    if not isinstance(stored, dict):
        raise CplCertError(f"{path} was not written by cpl-cert train, so it cannot be resumed")
    if meta["config"] != json.loads(config.to_json()):
        raise CplCertError(f"cannot resume {path}: it holds a different architecture than the options ask for")
    for key in RESUME_KEYS:
        if stored.get(key) != record.get(key):
            raise CplCertError(f"cannot resume {path}: it was trained with {key}={stored.get(key)!r}, this run asks for {record.get(key)!r}")
