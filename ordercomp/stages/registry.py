"""Stages by letter: the four built-in methods and any the user registers."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..errors import ArgumentTypeError, ConfigError
from .base import Stage

__all__ = ["AUTO", "register_stage", "unregister_stage", "stage_class", "letters", "parse_order", "plan_order"]

_STAGES: Dict[str, type] = {}
StageConfigs = Mapping[str, Union[Stage, Sequence[Stage]]]
AUTO = "auto"  # the order that asks compress for an order search first; reserved


def register_stage(cls: type, *, replace: bool = False) -> type:
    """Makes stage class ``cls`` usable in orders under its ``letter`` (usable as a class decorator).

    ``cls`` must be a dataclass subclass of :class:`Stage` whose ``letter`` is one uppercase
    letter; a letter already taken by another class is refused unless ``replace``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Stage) and dataclasses.is_dataclass(cls)):
        raise ArgumentTypeError(f"register_stage needs a dataclass subclass of ordercomp.stages.Stage, got {cls!r}")
    letter = getattr(cls, "letter", None)
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isalpha() and letter.isupper()):
        raise ConfigError(f"{cls.__name__}.letter must be one uppercase letter, got {letter!r}")
    if letter in AUTO.upper() and set(AUTO.upper()) <= set(_STAGES) | {letter} and _STAGES.get(letter) is None:
        raise ConfigError(f"letter {letter!r} would let registered letters spell the order {AUTO!r}, which is "
                          "reserved (compress runs an order search first); choose another letter")
    taken = _STAGES.get(letter)
    if taken is not None and taken is not cls and not replace:
        raise ConfigError(f"letter {letter!r} is taken by {taken.__name__}; pass replace=True to replace it")
    _STAGES[letter] = cls
    return cls


def unregister_stage(letter: str) -> None:
    """Removes a registered letter (the built-in D, P, Q, E cannot be removed)."""
    if letter in "DPQE":
        raise ConfigError(f"the built-in stage {letter!r} cannot be removed")
    _STAGES.pop(letter, None)


def stage_class(letter: str) -> type:
    """The stage class registered under ``letter``."""
    try:
        return _STAGES[letter]
    except KeyError:
        raise ConfigError(f"no stage is registered under {letter!r}; known: {letters()}") from None


def letters() -> str:
    """Every registered letter, the built-in D, P, Q, E first."""
    return "".join(_STAGES)


def parse_order(order: str, auto: bool = False) -> str:
    """Validates an order string: registered letters (D, P, Q, E and any added), case-insensitive,
    repeats allowed; with ``auto``, also ``"auto"`` (an order search decides; never a spelling of letters)."""
    known = letters()
    if not isinstance(order, str) or not order:
        raise ConfigError(f"order must be a non-empty string of the letters {known}{' or auto' if auto else ''}, "
                          f"got {order!r}")
    if order.lower() == AUTO:
        if not auto:
            raise ConfigError(f"order {order!r} asks for an order search, which compress() runs (order='auto' in "
                              "its config); here a string of letters is needed")
        return AUTO
    upper = order.upper()
    unknown = sorted(set(upper) - set(known))
    if unknown:
        raise ConfigError(f"order must use only the letters {known}, got {order!r} (unknown: {''.join(unknown)}; "
                          "a method of your own is known once registered with ordercomp.register_stage, on the "
                          "command line by --stage-module MODULE)")
    return upper


def plan_order(order: str, stages: Optional[StageConfigs] = None) -> List[Stage]:
    """The stage configs to run for ``order``, checked.

    ``stages`` maps a letter to its config, or to a list of configs used by the letter's
    successive occurrences (the last one repeats), e.g. ``{"P": [Prune(0.3), Prune(0.5)]}`` for
    ``"PP"``. Letters without a config use the defaults.
    """
    order = parse_order(order)
    stages = dict(stages or {})
    extra = sorted(set(stages) - set(letters()))
    if extra:
        raise ConfigError(f"stages has keys {extra}; allowed: {list(letters())}")
    plan, seen = [], {}
    for letter in order:
        cls = _STAGES[letter]
        given = stages.get(letter)
        options = list(given) if isinstance(given, (list, tuple)) else [given]
        config = options[min(seen.get(letter, 0), len(options) - 1)]
        seen[letter] = seen.get(letter, 0) + 1
        config = cls() if config is None else config
        if not isinstance(config, cls):
            raise ArgumentTypeError(f"stages[{letter!r}] must be a {cls.__name__}, got {type(config).__name__}")
        config.check()
        plan.append(config)
    return plan
