"""The grid of strengths: the methods, the steps of a run, their labels and the chains they form.

A run is a chain of steps ``(letter, strength)``; a chain continues from the saved model of its
prefix. This module knows how to spell, check and enumerate them; it runs nothing.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, Union

from ..checks import is_int, is_real
from ..errors import ConfigError
from ..stages import Distill, EarlyExit, Prune, Quantize, letters, stage_class
from ..stages.early_exit import DEFAULT_THRESHOLDS

__all__ = ["METHODS", "Step", "Chain", "SearchGrid", "PRESETS", "step_label", "chain_label"]

METHODS = "DPQE"
Step = Tuple[str, Any]
Chain = Tuple[Step, ...]


def _bits(value) -> Tuple[int, int]:
    """``(w_bits, a_bits)`` from a pair or a string like ``"4w8a"``."""
    if isinstance(value, str):
        w, sep, a = value.lower().rstrip("a").partition("w")
        if sep and w.isdigit() and a.isdigit():
            return int(w), int(a)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"Q grid entries must be (w_bits, a_bits) pairs or strings like '4w8a', got {value!r}")


def _grid_error(grid) -> ConfigError:
    return ConfigError(f"grid must be a SearchGrid, an integer >= 1 or one of {sorted(PRESETS)}, got {grid!r}")


@dataclass
class SearchGrid:
    """The strengths each method is run at.

    ``D``: student widths in (0, 1) (a re-initialised thinner copy of the original model) or zoo
    names; ``P``: pruning ratios in (0, 1); ``Q``: ``(w_bits, a_bits)`` pairs or ``"4w8a"``
    strings; ``E``: the confidence thresholds swept (one run gives a point per threshold).
    ``others``: for a stage added with :func:`~ordercomp.register_stage`, by letter, the
    strengths it runs at (``{setting: value}`` each); a registered stage not given runs at the
    weakest, middle and strongest values of its first ladder (:meth:`~ordercomp.stages.Stage.strengths`),
    or once at its defaults when it has none.
    """

    D: Sequence[Union[float, str]] = (0.5,)
    P: Sequence[float] = (0.3, 0.5, 0.7)
    Q: Sequence[Any] = ((8, 8), (4, 8), (2, 8))
    E: Sequence[float] = DEFAULT_THRESHOLDS
    others: Dict[str, Sequence[Dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.D = tuple(self.D)
        self.P = tuple(self.P)
        self.Q = tuple(_bits(b) for b in self.Q)
        self.E = tuple(self.E)
        for letter in METHODS:
            if not getattr(self, letter):
                raise ConfigError(f"grid {letter} must hold at least one strength, got an empty list")
        for d in self.D:
            if not (isinstance(d, str) or (is_real(d) and 0 < d < 1)):
                raise ConfigError(f"grid D: entries must be widths in (0, 1) or zoo model names, got {d!r}")
        checks = [("D", lambda d: Distill(student=d) if isinstance(d, str) else None),
                  ("P", lambda r: Prune(ratio=r)), ("Q", lambda b: Quantize(w_bits=b[0], a_bits=b[1]))]
        for letter, check in checks:
            for value in getattr(self, letter):
                try:
                    check(value)
                except ValueError as exc:
                    raise ConfigError(f"grid {letter}: {exc}") from exc
        try:
            EarlyExit(thresholds=self.E)
        except ValueError as exc:
            raise ConfigError(f"grid E: {exc}") from exc
        self.P = tuple(float(r) for r in self.P)
        self.others = {letter: self._other(letter, strengths) for letter, strengths in dict(self.others).items()}

    @staticmethod
    def _other(letter: str, strengths) -> Tuple[Tuple[Tuple[str, Any], ...], ...]:
        """The strengths of registered stage ``letter``, each checked by setting its config to it."""
        if letter in METHODS:
            raise ConfigError(f"grid others: {letter!r} is a built-in method, give it as {letter}= instead")
        cls = stage_class(letter)
        if isinstance(strengths, (str, bytes, dict)) or not isinstance(strengths, Sequence) or not strengths:
            raise ConfigError(f"grid others[{letter!r}] must be a non-empty list of {{setting: value}}, got {strengths!r}")
        out = []
        for strength in strengths:
            try:
                cls().at(**dict(strength))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"grid others[{letter!r}]: {strength!r}: {exc}") from None
            out.append(tuple(dict(strength).items()))
        return tuple(out)

    def steps(self, letter: str) -> List[Step]:
        """The steps of ``letter``: one per strength, a single step for E (its thresholds are swept);
        a registered method outside D, P, Q, E: its ``others`` strengths or its own ladder's."""
        if letter not in METHODS:
            if letter in self.others:
                return [(letter, s) for s in self.others[letter]]
            ladders = stage_class(letter)().strengths()
            if not ladders:
                return [(letter, None)]
            name, ladder = next(iter(ladders.items()))
            picks = sorted({0, (len(ladder) - 1) // 2, len(ladder) - 1})
            return [(letter, ((name, ladder[i]),)) for i in picks]
        if letter == "E":
            return [("E", tuple(float(t) for t in self.E))]
        if letter == "Q":
            return [("Q", tuple(b)) for b in self.Q]
        return [(letter, v) for v in getattr(self, letter)]

    def to_dict(self) -> Dict[str, list]:
        out = {letter: [list(v) if isinstance(v, tuple) else v for v in getattr(self, letter)] for letter in METHODS}
        if self.others:
            out["others"] = {letter: [dict(s) for s in strengths] for letter, strengths in self.others.items()}
        return out

    @classmethod
    def of(cls, grid: Union["SearchGrid", str, int, None]) -> "SearchGrid":
        """A grid from a :class:`SearchGrid`, a preset name (see ``PRESETS``) or a number of strengths
        per method (evenly picked from the "large" preset; E keeps its thresholds)."""
        if grid is None:
            return cls()
        if isinstance(grid, cls):
            return grid
        if isinstance(grid, str):
            if grid not in PRESETS:
                raise _grid_error(grid)
            return copy.deepcopy(PRESETS[grid])
        if not is_int(grid) or grid < 1:
            raise _grid_error(grid)
        large = PRESETS["large"]

        def pick(values):
            if grid >= len(values):
                return values
            return tuple(values[round(i * (len(values) - 1) / max(grid - 1, 1))] for i in range(grid))

        return cls(D=pick(large.D), P=pick(large.P), Q=pick(large.Q), E=large.E)

    @classmethod
    def from_budget(cls, budget: Union["SearchGrid", str, int, None]) -> "SearchGrid":
        """Deprecated name of :meth:`of` (the grid was called the search's budget)."""
        warnings.warn("SearchGrid.from_budget is now SearchGrid.of", DeprecationWarning, stacklevel=2)
        return cls.of(budget)


PRESETS: Dict[str, SearchGrid] = {
    "tiny": SearchGrid(D=(0.5,), P=(0.5,), Q=((4, 8),), E=(0.6, 0.9)),
    "small": SearchGrid(),
    "medium": SearchGrid(D=(0.75, 0.5), P=(0.2, 0.4, 0.6, 0.8), Q=((8, 8), (4, 8), (2, 8), (1, 8))),
    "large": SearchGrid(D=(0.75, 0.5, 0.25), P=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                        Q=((8, 8), (4, 8), (4, 4), (2, 8), (1, 8))),
}


def step_label(step: Step) -> str:
    """``D(w=0.5)``, ``P(0.3)``, ``Q(4w8a)``, or the bare letter."""
    letter, value = step
    if letter == "D":
        return f"D({value})" if isinstance(value, str) else f"D(w={value:g})"
    if letter == "P":
        return f"P({value:g})"
    if letter == "Q":
        return f"Q({value[0]}w{value[1]}a)"
    if letter not in METHODS and value:  # a registered stage's strength
        return stage_class(letter)().label(dict(value))
    return letter


def chain_label(chain: Chain) -> str:
    """The steps' labels in order; ``original`` for the empty chain."""
    return " ".join(step_label(s) for s in chain) or "original"


def _jsonable_step(step: Step) -> list:
    letter, value = step
    return [letter, list(value) if isinstance(value, tuple) else value]


def _check_methods(methods) -> str:
    """``methods`` upper-cased, if it is 2 or more distinct registered letters."""
    known = letters()
    ok = isinstance(methods, str) and 2 <= len(methods) <= len(known) and len(set(methods.upper())) == len(methods) \
        and set(methods.upper()) <= set(known)
    if not ok:
        raise ConfigError(f"methods must be 2 to {len(known)} distinct letters of {known} (e.g. 'PQ'), got {methods!r}")
    return methods.upper()


def _sequence_chains(sequence: str, grid: SearchGrid) -> List[Chain]:
    """Every chain of ``sequence``: one step of each letter, over the grid's strengths."""
    return [tuple(c) for c in itertools.product(*(grid.steps(letter) for letter in sequence))]
