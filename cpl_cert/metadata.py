"""The type of every checkpoint metadata field (docs/checkpoint-format.md), checked on load.

A checkpoint's metadata is JSON anyone can edit: a field of the wrong type must fail with one sentence
naming it (``dataset.input_shape must be a list of 3 whole numbers >= 1, got 5``), never a
``TypeError`` deep inside a command, and never be taken loosely (``"abcd"`` as four class names,
``4.0`` as a count). ``config`` and ``dataset`` accept only their documented keys; ``training`` is a
record whose documented keys are checked and whose other keys are kept as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from .errors import CplCertError


@dataclass(frozen=True)
class Field:
    """A check of one value and what the value must be, for the message."""

    ok: Callable[[Any], bool]
    what: str


Spec = Union[Field, "Record"]


@dataclass(frozen=True)
class Record:
    """A JSON object with known fields; ``open`` allows other keys (kept unchecked)."""

    fields: dict[str, Spec]
    open: bool = False


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def whole(low: int | None = None) -> Field:
    """An integer (not a bool, not 4.0), at least ``low``."""
    return Field(lambda v: _is_whole(v) and (low is None or v >= low), "a whole number" + (f" >= {low}" if low is not None else ""))


def number(low: float | None = None, high: float | None = None, positive: bool = False) -> Field:
    """A finite number (int or float, not a bool) in ``[low, high]``, or above 0 when ``positive``."""
    def ok(v: Any) -> bool:
        return _is_number(v) and (low is None or v >= low) and (high is None or v <= high) and (not positive or v > 0)

    if low is not None and high is not None:
        bounds = f" in [{low:g}, {high:g}]"
    else:
        bounds = " above 0" if positive else f" >= {low:g}" if low is not None else ""
    return Field(ok, f"a finite number{bounds}")


def text(non_empty: bool = True) -> Field:
    """A string (non-empty unless told)."""
    return Field(lambda v: isinstance(v, str) and (bool(v) or not non_empty), "a non-empty string" if non_empty else "a string")


def list_of(item: Field, what: str, length: int | None = None) -> Field:
    """A non-empty JSON list of ``item`` values (exactly ``length`` of them when given), described as ``what``."""
    def ok(v: Any) -> bool:
        sized = isinstance(v, list) and (len(v) == length if length is not None else len(v) > 0)
        return sized and all(item.ok(x) for x in v)

    return Field(ok, what)


def optional(field: Field) -> Field:
    """``null`` or ``field``."""
    return Field(lambda v: v is None or field.ok(v), f"null or {field.what}")


def mapping(value: Field, what: str) -> Field:
    """A JSON object whose every value is ``value``, described as ``what``."""
    return Field(lambda v: isinstance(v, dict) and all(value.ok(x) for x in v.values()), what)


OBJECT = Field(lambda v: isinstance(v, dict), "a JSON object")
SHAPE = list_of(whole(1), "a list of 3 whole numbers >= 1 (channels, height, width)", length=3)
MEAN = list_of(number(), "a non-empty list of finite numbers")
STD = list_of(number(positive=True), "a non-empty list of finite numbers above 0")
CLASSES = list_of(text(non_empty=False), "a non-empty list of strings")

CONFIG = Record({
    "input_shape": SHAPE, "num_classes": whole(2), "channels": whole(1), "conv_depth": whole(0), "dense_depth": whole(0),
    "conv_inner": whole(1), "dense_inner": whole(1), "pool": whole(1), "head": text(), "mean": MEAN, "std": optional(STD),
    "preset": optional(text()), "layer": text(),
})
DATASET = Record({"name": text(), "input_shape": SHAPE, "num_classes": whole(2), "classes": CLASSES, "mean": MEAN, "std": STD})
FRACTION = number(0.0, 1.0)
CERTIFIED = mapping(FRACTION, "an object whose values are finite numbers in [0, 1]")
VERSIONS = mapping(text(non_empty=False), "an object whose values are strings")
TRAINING = Record(
    {
        "epochs": whole(0), "epochs_completed": whole(0), "seed": whole(), "batch_size": whole(1), "train_images": whole(0),
        "eval_n": whole(0), "world_size": whole(1), "clean_accuracy": FRACTION, "certified": CERTIFIED,
        "lipschitz_upper": number(positive=True), "wall_seconds": number(low=0.0), "augmentation": text(non_empty=False),
        "device": text(), "command": text(non_empty=False), "versions": VERSIONS, "args": OBJECT,
        "provenance": OBJECT,
        "loss": Record({"name": text(), "margin": number(), "offset": number(), "temperature": number()}, open=True),
        "optimizer": Record({"name": text(), "lr": number(low=0.0), "weight_decay": number(low=0.0), "schedule": text(non_empty=False)}, open=True),
    },
    open=True,
)
ENTRIES = {"config": CONFIG, "dataset": DATASET, "training": TRAINING}


def _shown(value: Any) -> str:
    """The offending value as JSON, cut to 60 characters."""
    shown = json.dumps(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def check_record(value: Any, spec: Record, path: str, source: str) -> None:
    """Raise ``CplCertError`` naming the first field of ``value`` (at ``path``) that ``spec`` refuses."""
    if not isinstance(value, dict):
        raise CplCertError(f"{source}: the metadata field {path} must be a JSON object, got {_shown(value)}")
    for key, item in value.items():
        field = spec.fields.get(key)
        if field is None:
            if spec.open:
                continue
            raise CplCertError(f"{source}: the metadata field {path} has an unknown key {key!r}; it may hold {', '.join(spec.fields)}")
        if isinstance(field, Record):
            check_record(item, field, f"{path}.{key}", source)
        elif not field.ok(item):
            raise CplCertError(f"{source}: the metadata field {path}.{key} must be {field.what}, got {_shown(item)}")


def check_metadata(meta: dict[str, Any], source: str) -> None:
    """Type-check the decoded ``config``, ``dataset`` and ``training`` entries of a checkpoint."""
    for name, spec in ENTRIES.items():
        check_record(meta[name], spec, name, source)
