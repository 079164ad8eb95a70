"""Checkpoints: one ``.safetensors`` file (never pickle) with JSON metadata; see docs/checkpoint-format.md."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import CplCertError
from .files import atomic_write
from .freezing import freeze, is_frozen
from .metadata import check_metadata
from .models import CPLNet, ModelConfig
from .validate import validate_against_metadata, validate_model

FORMAT_NAME = "cpl-cert"
FORMAT_VERSION = 1
FORMAT = f"{FORMAT_NAME}/{FORMAT_VERSION}"
REQUIRED_METADATA = ("format", "config", "dataset", "training")
MAX_HEADER_BYTES = 100_000_000


def save_checkpoint(
    model: CPLNet,
    path: str | os.PathLike[str],
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (frozen first if needed) and its metadata to ``path`` atomically.

    ``extra_tensors`` are stored under the ``extra.`` prefix (used by training to keep its resume state).
    """
    if not is_frozen(model):
        freeze(model)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in model.state_dict().items()}
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t.detach().cpu().contiguous().clone()
    metadata = {
        "format": FORMAT,
        "config": model.config.to_json(),
        "dataset": json.dumps(dataset or {}, sort_keys=True),
        "training": json.dumps(training or {}, sort_keys=True),
    }
    return atomic_write(path, save(tensors, metadata=metadata))


def _check_container(path: Path) -> None:
    """Reject files that are not safetensors before any parser sees them (pickle is never loaded)."""
    if not path.exists():
        raise CplCertError(f"{path} does not exist")
    if path.is_dir():
        raise CplCertError(f"{path} is a folder, not a checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) == 8:
            (header_len,) = struct.unpack("<Q", head)
            if 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8) and handle.read(1) == b"{":
                return  # a safetensors header; the parser checks the rest
    # Not a safetensors header. Pickle magic is only trusted here: a header length can start with 0x80.
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CplCertError(
            f"{path} is a pickle / torch.save file; cpl-cert only reads .safetensors checkpoints and never unpickles "
            "(a checkpoint of the CPL paper's reference code converts with cpl-cert import, docs/deploy.md)"
        )
    if len(head) < 8:
        raise CplCertError(f"{path} is not a safetensors file (only {size} bytes)")
    raise CplCertError(f"{path} is not a valid safetensors file (truncated, or another format)")


def _parse_json_field(metadata: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError):
        raise CplCertError(f"{path} has malformed '{key}' metadata (not valid JSON)") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's metadata with JSON fields decoded and every field type-checked; raises ``CplCertError``."""
    file = Path(path)
    _check_container(file)
    try:
        with safe_open(str(file), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CplCertError(f"{file} is not a valid safetensors file ({str(exc).splitlines()[0]})") from None
    missing = [key for key in REQUIRED_METADATA if key not in raw]
    if missing:
        raise CplCertError(f"{file} is not a cpl-cert checkpoint: metadata lacks {', '.join(missing)}")
    name, _, version = raw["format"].partition("/")
    if name != FORMAT_NAME or not version.isdigit():
        raise CplCertError(f"{file} has an unknown format {raw['format']!r} (expected {FORMAT})")
    if int(version) > FORMAT_VERSION:
        raise CplCertError(
            f"{file} was written in format {raw['format']}, newer than this cpl-cert reads ({FORMAT}); upgrade cpl-cert"
        )
    meta: dict[str, Any] = {"format": raw["format"]}
    for key in ("config", "dataset", "training"):
        meta[key] = _parse_json_field(raw, key, file)
    check_metadata(meta, str(file))
    for key, value in raw.items():
        meta.setdefault(key, value)
    return meta


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[CPLNet, dict[str, Any]]:
    """Load and validate a checkpoint; returns the frozen model in eval mode and its metadata.

    Fails with one ``CplCertError`` sentence on a missing key, wrong shape, non-finite weight,
    truncated file, pickle file or newer format.
    """
    file = Path(path)
    meta = read_metadata(file)
    config = ModelConfig.from_dict(meta["config"])
    model = CPLNet(config)
    expected = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if not name.startswith("extra."):
                    tensors[name] = handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CplCertError(f"{file} is damaged and cannot be read ({str(exc).splitlines()[0]})") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CplCertError(f"{file} lacks the tensor {missing[0]} that its architecture needs")
    if unexpected:
        raise CplCertError(f"{file} has a tensor {unexpected[0]} that its architecture does not have")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CplCertError(
                f"{file}: tensor {name} has shape {tuple(tensor.shape)}, its architecture needs {tuple(expected[name].shape)}"
            )
        if tensor.dtype != expected[name].dtype:
            raise CplCertError(f"{file}: tensor {name} is {tensor.dtype}, its architecture needs {expected[name].dtype}")
    model.load_state_dict(tensors)
    validate_model(model, source=str(file))
    validate_against_metadata(model, meta, source=str(file))
    if not is_frozen(model):
        raise CplCertError(f"{file} holds a model that was never frozen (a CPL layer has no fixed step, or an SLL layer no fixed rescaling)")
    model.eval()
    return model.to(device), meta
