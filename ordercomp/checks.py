"""Argument checks with the house messages: each names the argument, what is allowed and what it got.

``integer("epochs", 0, low=1)`` raises ``ConfigError("epochs must be an integer >= 1, got 0")``.
Booleans are never accepted as numbers, NaN never passes a range, and infinity passes only a
range that is open-ended on that side (``finite=False``).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Collection, Mapping, Optional, Sequence

import torch

from .errors import ArgumentTypeError, ConfigError

__all__ = ["is_int", "is_real", "integer", "number", "bits", "flag", "one_of", "tensor", "describe"]


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int or float, numpy scalars included) that is not a ``bool``."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def integer(name: str, value: Any, low: Optional[int] = None, high: Optional[int] = None, *,
            optional: bool = False) -> Optional[int]:
    """``value`` if it is an integer in ``low..high`` (either bound may be None), or None when ``optional``."""
    if optional and value is None:
        return None
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f"an integer in {low}..{high}"
        elif low is not None:
            allowed = f"an integer >= {low}"
        elif high is not None:
            allowed = f"an integer <= {high}"
        else:
            allowed = "an integer"
        raise ConfigError(f"{name} must be {allowed}{' or None' if optional else ''}, got {value!r}")
    return value


def number(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False, finite: bool = True, optional: bool = False) -> Optional[float]:
    """``float(value)`` if it is a real number within the bounds, or None when ``optional``.

    ``low_open`` / ``high_open`` exclude the bound itself; with ``finite`` infinity is refused
    even where a bound is infinite. NaN is always refused.
    """
    if optional and value is None:
        return None
    ok = is_real(value) and not math.isnan(value) and (math.isfinite(value) or not finite)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        kind = "a finite number" if finite else "a number"
        if math.isinf(low) and math.isinf(high):
            allowed = kind
        elif math.isinf(high):
            allowed = f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
        elif math.isinf(low):
            allowed = f"{kind} {'<' if high_open else '<='} {_fmt(high)}"
        else:
            allowed = f"a number in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be {allowed}{' or None' if optional else ''}, got {value!r}")
    return float(value)


def bits(name: str, value: Any, low: int, high: int, *, also: Sequence[int] = ()) -> int:
    """A bit width: an integer in ``low..high`` or one of ``also`` (e.g. 32 for float)."""
    if not is_int(value) or not (low <= value <= high or value in also):
        extra = "".join(f" or {a}" for a in also)
        raise ConfigError(f"{name} must be an integer in {low}..{high}{extra}, got {value!r}")
    return value


def flag(name: str, value: Any, optional: bool = False) -> Optional[bool]:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not a string), or None when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")
    return value


def one_of(name: str, value: Any, allowed: Collection[Any]) -> Any:
    """``value`` if it is one of ``allowed``."""
    try:
        ok = value in allowed
    except TypeError:  # unhashable value against a set
        ok = False
    if not ok:
        raise ConfigError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def describe(value: Any) -> str:
    """A short description of a value's form (a model's output, a batch), for error messages:
    ``a tensor of shape (2, 10)``, ``a dict with keys ['logits']``, ``a list of 2 (Tensor, int)``."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def tensor(name: str, value: Any, floating: bool = False) -> Any:
    """``value`` if it is a torch.Tensor (of a floating-point dtype with ``floating``)."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value
