"""Evidence from points: Pareto fronts, best BitOpsCR under loss limits, the gap between fronts, verdicts.

Each run is an (accuracy, BitOps) point, or one point per threshold when the model has exits.
The fronts of AB and BA in the (accuracy, BitOpsCR) plane give the verdict of the pair AB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["LIMITS", "TIE_THRESHOLD", "Point", "pareto_front", "best_cr", "front_gap", "PairEvidence", "compare"]

LIMITS = (0.2, 0.6, 1.0, 2.0)
TIE_THRESHOLD = 0.2  # pp: a mean front gap below this is a tie (the tightest loss limit of Table 1)
Point = Dict[str, float]


def _limit_key(limit: float) -> str:
    """The JSON key of an accuracy-loss limit: "0.2", "1.0"."""
    return str(float(limit))


def pareto_front(points: Sequence[Point]) -> List[Point]:
    """The points no other point beats in both accuracy and BitOpsCR, by increasing BitOpsCR."""
    front = []
    for p in sorted(points, key=lambda p: (-p["bitops_cr"], -p["accuracy"])):
        if not front or p["accuracy"] > front[-1]["accuracy"]:
            front.append(p)
    return front[::-1]


def best_cr(points: Sequence[Point], original_accuracy: float, limit: float) -> Optional[float]:
    """The highest BitOpsCR among points that lose at most ``limit`` pp of accuracy (None: none does)."""
    ok = [p["bitops_cr"] for p in points if original_accuracy - p["accuracy"] <= limit + 1e-9]
    return max(ok) if ok else None


def front_gap(a: Sequence[Point], b: Sequence[Point]) -> Tuple[float, float]:
    """``(area, mean gap)`` between the fronts of ``a`` and ``b`` on a log10 BitOpsCR axis.

    Each front is the step function "best accuracy reachable at a BitOpsCR of at least x", read
    from 1x (the original model) to the highest BitOpsCR of all points; beyond its own highest
    BitOpsCR a front counts at the lowest accuracy among all points. ``area`` (pp x decades)
    integrates ``front_a - front_b``: the difference of the fronts' hypervolumes against the
    reference point (1x, lowest accuracy). The mean gap (pp) divides it by the range's width.
    Positive favours ``a``.
    """
    points = list(a) + list(b)
    floor = min(p["accuracy"] for p in points)
    xs = sorted({0.0} | {math.log10(p["bitops_cr"]) for p in points})

    def level(front, x):
        return max((p["accuracy"] for p in front if math.log10(p["bitops_cr"]) >= x - 1e-12), default=floor)

    if len(xs) == 1:
        return 0.0, level(a, xs[0]) - level(b, xs[0])
    area = sum((level(a, hi) - level(b, hi)) * (hi - lo) for lo, hi in zip(xs, xs[1:]))
    return area, area / (xs[-1] - xs[0])


@dataclass
class PairEvidence:
    """Both orders of a pair: their points, the best BitOpsCR per loss limit, and the verdict.

    ``margin`` (pp) is the mean accuracy gap between the fronts of ``first`` and ``second``
    (see :func:`front_gap`), positive when ``first`` (the pair as written) is better; ``winner``
    is the better order when the verdict is decisive, else None (a tie).
    """

    pair: str
    points: Dict[str, List[Point]]
    best: Dict[str, Dict[str, Optional[float]]]
    area: float
    margin: float
    decisive: bool
    winner: Optional[str]
    limit_votes: Dict[str, int]

    @property
    def edge(self) -> Optional[Tuple[str, str]]:
        """``(before, after)`` of the decisive verdict, or None for a tie."""
        return (self.winner[0], self.winner[1]) if self.winner else None

    def verdict(self) -> str:
        if self.winner:
            return f"{self.winner[0]} before {self.winner[1]} (margin {abs(self.margin):.2f} pp, decisive)"
        return f"tie (margin {self.margin:+.2f} pp for {self.pair})"

    def to_dict(self) -> Dict[str, Any]:
        return {"pair": self.pair, "winner": self.winner, "decisive": self.decisive, "margin": self.margin,
                "area": self.area, "limit_votes": self.limit_votes,
                "best_cr": {k: v for k, v in self.best.items()},
                "fronts": {k: pareto_front(v) for k, v in self.points.items()}, "points": self.points}


def compare(pair: str, ab: Sequence[Point], ba: Sequence[Point], original_accuracy: float,
            limits: Sequence[float] = LIMITS, tie_threshold: float = TIE_THRESHOLD) -> PairEvidence:
    """The verdict of ``pair`` ("AB") from the points of AB and of BA.

    Decisive when the mean gap between the fronts is at least ``tie_threshold`` pp and the best
    BitOpsCR under the loss limits does not favour the other order in more limits (a limit
    counts for an order whose best BitOpsCR is over 5 % higher, or that alone meets it);
    otherwise a tie.
    """
    first, second = pair, pair[::-1]
    best = {_limit_key(limit): {first: best_cr(ab, original_accuracy, limit), second: best_cr(ba, original_accuracy, limit)}
            for limit in limits}
    votes = {first: 0, second: 0}
    for values in best.values():
        x, y = values[first], values[second]
        if x is not None and (y is None or x > 1.05 * y):
            votes[first] += 1
        elif y is not None and (x is None or y > 1.05 * x):
            votes[second] += 1
    area, margin = front_gap(ab, ba)
    leader, other = (first, second) if margin > 0 else (second, first)
    decisive = abs(margin) >= tie_threshold and votes[other] <= votes[leader]
    return PairEvidence(pair, {first: list(ab), second: list(ba)}, best, area, margin, decisive,
                        leader if decisive else None, votes)
