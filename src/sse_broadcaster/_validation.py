"""Argument checks shared by the configs and constructors of the package.

Each raises `TypeError` for a wrong type and `ValueError` for a value out of
range, with a message that names the field and repr's the value:
``max_connections must be >= 1, got 0``. A bool is never taken for a number.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "check_minimum", "check_positive", "check_seconds"]


def _check_number(name: str, value: Any, kind: str, *, optional: bool) -> bool:
    """Raise `TypeError` unless ``value`` is an int or float; False for an allowed None."""
    if value is None and optional:
        return False
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = f"{kind} or None" if optional else kind
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    return True


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """An int >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def check_positive(name: str, value: Any, *, unit: str = "seconds", optional: bool = False) -> None:
    """A finite number > 0 of ``unit`` (or None when ``optional``): an interval or a size."""
    if not _check_number(name, value, f"a number of {unit}", optional=optional):
        return
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_seconds(name: str, value: Any, *, optional: bool = False, positive: bool = False) -> None:
    """A finite number of seconds, > 0 if ``positive`` else >= 0.

    With ``optional``, None is allowed and means "no limit", which the message
    for an infinite value suggests instead.
    """
    if not _check_number(name, value, "a number of seconds", optional=optional):
        return
    if math.isnan(value) or math.isinf(value):
        hint = " (use None for no limit)" if optional else ""
        raise ValueError(f"{name} must be finite{hint}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_minimum(name: str, value: Any, minimum: float) -> None:
    """A number >= ``minimum``, infinity included; NaN is no number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
