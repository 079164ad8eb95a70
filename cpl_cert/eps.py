"""Radii to certify or attack at, as the user writes them: ``0.25``, ``36/255``, or a comma-separated list.

The one reader of radii: the library and every command parse them here, so a bad value gets the same
sentence everywhere (a negative, zero or non-finite number is refused as such, not as unreadable).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CplCertError

NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+))?\s*")
"""A positive number or fraction: ``0.25``, ``1e-2``, ``36/255``."""


@dataclass
class EpsValue:
    """A radius to certify at, with the label the user wrote (``36/255`` or ``0.25``)."""

    value: float
    label: str


EpsSpec = str | float | Sequence[str | float | EpsValue]
"""What ``parse_eps`` reads: ``"0.1,0.25,36/255"``, a number, or a list of numbers, strings or ``EpsValue``."""


def parse_eps(spec: EpsSpec) -> list[EpsValue]:
    """Parse ``"0.1,0.25,36/255"`` (or a list of numbers, strings or ``EpsValue``) into positive radii."""
    items: Sequence[str | float | EpsValue]
    if isinstance(spec, str):
        items = [part.strip() for part in spec.split(",")]
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    values = [_parse_one(item) for item in items]
    if not values:
        raise CplCertError("give at least one eps")
    return values


def parse_single_eps(spec: str | float | EpsValue) -> EpsValue:
    """One radius (``"36/255"``, ``0.25`` or an ``EpsValue``); a list of several is refused with one sentence."""
    values = parse_eps(spec if isinstance(spec, str) else [spec])
    if len(values) != 1:
        raise CplCertError(f"give one eps, got {len(values)}")
    return values[0]


def _parse_one(item: str | float | EpsValue) -> EpsValue:
    """One radius and its label; refused with one sentence unless it is a positive, finite number."""
    if isinstance(item, EpsValue):
        value, label = float(item.value), item.label
    elif isinstance(item, (int, float)):
        value, label = float(item), f"{float(item):g}"
    else:
        _refuse_non_positive(item)
        match = NUMBER.fullmatch(item)
        if not match:
            raise CplCertError(f"cannot read eps {item!r}; write numbers like 0.25 or fractions like 36/255, separated by commas")
        denominator = float(match.group(2)) if match.group(2) else 1.0
        if denominator == 0:
            raise CplCertError(f"cannot read eps {item!r}: division by zero")
        value = float(match.group(1)) / denominator
        label = item.strip().replace(" ", "")
    if not math.isfinite(value) or value <= 0:
        raise CplCertError(f"eps must be positive and finite, got {item!r}")
    return EpsValue(value, label)


def _refuse_non_positive(item: str) -> None:
    """A number that is negative, zero or not finite (``-1``, ``0``, ``inf``, ``nan``) is refused as such, not as unreadable;
    so is any text that starts with a minus sign."""
    text = item.strip()
    try:
        value = float(text)
    except ValueError:
        value = -1.0 if text.startswith("-") else 1.0
    if not (math.isfinite(value) and value > 0):
        raise CplCertError(f"eps must be positive and finite, got {text!r}")
