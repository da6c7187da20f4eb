"""Validation of numeric settings, so a bad number fails at construction with an error that names it."""

from __future__ import annotations

import math
import numbers

from .exceptions import ConfigurationError

__all__ = ["check_count", "check_non_negative", "check_positive"]


def check_positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    """``value`` is a finite number > 0 (or None when ``allow_none``).

    Raises:
        ConfigurationError: naming ``name``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not value > 0:
        raise ConfigurationError(f"{name} must be a finite number > 0, got {value!r}")


def check_non_negative(name: str, value: float) -> None:
    """``value`` is a finite number ≥ 0 (a price may be 0: a local model costs nothing).

    Raises:
        ConfigurationError: naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not value >= 0:
        raise ConfigurationError(f"{name} must be a finite number ≥ 0, got {value!r}")


def check_count(
    name: str, value: int | None, *, minimum: int = 1, maximum: int | None = None, allow_none: bool = True
) -> None:
    """``value`` is a whole number ≥ ``minimum`` and ≤ ``maximum`` (or None when ``allow_none``).

    Raises:
        ConfigurationError: naming ``name``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{name} must be a whole number ≥ {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum:,}, got {value:,}")
