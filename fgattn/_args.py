"""Checks of constructor arguments, run once at construction.

A wrong type raises TypeError, a wrong value ValueError; both name the argument, what it got and
what it wanted. Each check returns the value normalised (an int as int, a real number as float).

Bounds shared by the layers: `MAX_CHANNELS` (φ of SCI/CCI holds 9·C² weights) and `MAX_SCALE`
(logit scales and loss weights beyond it are not a setting but a typo; they overflow float32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

MAX_CHANNELS = 2**16
MAX_SCALE = 1e4


def integer(
    value: object, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An int (not a bool) in [`minimum`, `maximum`]."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value}")
    return int(value)


def optional(check, value: object, name: str, **kwargs):
    """None, or `value` checked by `check` (e.g. ``optional(integer, dim, "dim", minimum=1)``)."""
    return None if value is None else check(value, name, **kwargs)


def real(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real number (not a bool) in [low, high], or (low, high] with `low_open`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    if not math.isfinite(value) or below or (high is not None and value > high):
        opening = "(" if low_open or low is None else "["
        closing = ")" if high is None else "]"
        lo, hi = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        interval = f"{opening}{lo}, {hi}{closing}"
        raise ValueError(f"{name} must be a finite float in {interval}, got {value}")
    return value


def choice(value: object, name: str, choices: Sequence[str]) -> str:
    """One of the strings `choices`."""
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a str, one of {tuple(choices)}; got {type(value).__name__}"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def boolean(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value
