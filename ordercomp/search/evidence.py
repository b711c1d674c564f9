"""Evidence from points: Pareto fronts, best BitOpsCR under loss limits, the gap between fronts, verdicts.

Each run is an (accuracy, BitOps) point, or one point per threshold when the model has exits.
The fronts of AB and BA in the (accuracy, BitOpsCR) plane give the verdict of the pair AB.

A point may carry its per-input correctness on the held-out data (``correct``, as
:func:`ordercomp.stats.pack_correct` writes it) and the seed of its run (``seed``). With them
every verdict has a confidence interval for its margin: a paired bootstrap over the inputs
(each resample reweights the same inputs for every point, so the orders are compared on the
same data), over the seeds too when there are several (each resample also draws the seeds,
so their spread is folded in). The resampled margins (:attr:`PairEvidence.resampled`) also
say how often the order graph sorts to the same order (:func:`order_confidence` in
:mod:`.graph`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import stats

__all__ = ["LIMITS", "TIE_THRESHOLD", "RESAMPLES", "CONFIDENCE", "Point", "pareto_front", "best_cr", "front_gap",
           "PairEvidence", "compare", "Resampling", "best_cr_interval", "resampled_gaps"]

LIMITS = (0.2, 0.6, 1.0, 2.0)
TIE_THRESHOLD = 0.2  # pp: a mean front gap below this is a tie (the tightest loss limit of Table 1)
RESAMPLES = 1000  # bootstrap resamples of every interval
CONFIDENCE = 0.95  # of every interval
Point = Dict[str, Any]


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


class Resampling:
    """The bootstrap every interval of one search shares: ``resamples`` draws of how often each
    of the ``n`` held-out inputs counts (a multinomial over the inputs) and, for up to ``seeds``
    seeds, which seeds each draw takes; fixed by ``seed``, so a rerun gives the same intervals."""

    def __init__(self, n: int, seeds: int = 1, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n, self.resamples, self.confidence = n, resamples, confidence
        self.weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float32)  # [B, N]
        self.seed_draws = rng.integers(0, max(seeds, 1), size=(resamples, max(seeds, 1)))  # [B, S]

    def accuracies(self, points: Sequence[Point]) -> np.ndarray:
        """``[points, resamples]``: each point's accuracy (%) under every resample of the inputs."""
        correct = np.stack([stats.unpack_correct(p["correct"]).numpy() for p in points]).astype(np.float32)
        if correct.shape[1] != self.n:
            raise ValueError(f"points were measured on {correct.shape[1]} inputs, the resampling is of {self.n}")
        return 100.0 * correct @ self.weights.T / self.n

    def interval(self, values: np.ndarray) -> Tuple[float, float]:
        """The two-sided percentile interval of resampled ``values``."""
        tail = 100.0 * (1.0 - self.confidence) / 2.0
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    def over_seeds(self, per_seed: np.ndarray) -> np.ndarray:
        """``[resamples]`` from ``[seeds, resamples]``: each resample's mean over the seeds it drew."""
        if per_seed.shape[0] == 1:
            return per_seed[0]
        draws = self.seed_draws[:, :per_seed.shape[0]] % per_seed.shape[0]
        return per_seed[draws, np.arange(per_seed.shape[1])[:, None]].mean(axis=1)


def resampled_gaps(a: Sequence[Point], b: Sequence[Point], acc_a: np.ndarray, acc_b: np.ndarray) -> np.ndarray:
    """:func:`front_gap`'s mean gap for every resample (``acc_*``: ``[points, resamples]``)."""
    cr = np.array([math.log10(p["bitops_cr"]) for p in list(a) + list(b)])
    xs = np.array(sorted({0.0} | set(cr.tolist())))
    acc = np.concatenate([acc_a, acc_b])
    floor = acc.min(axis=0)  # [B]
    in_a = np.arange(len(cr)) < len(a)

    def levels(mask: np.ndarray) -> np.ndarray:  # [K, B]: the front's best accuracy at a BitOpsCR >= x
        reach = (cr[None, :] >= xs[:, None] - 1e-12) & mask[None, :]  # [K, P]
        best = np.where(reach[:, :, None], acc[None, :, :], -np.inf).max(axis=1)
        return np.where(np.isfinite(best), best, floor[None, :])

    gap = levels(in_a) - levels(~in_a)
    if len(xs) == 1:
        return gap[0]
    widths = np.diff(xs)
    return (gap[1:] * widths[:, None]).sum(axis=0) / (xs[-1] - xs[0])


def best_cr_interval(points: Sequence[Point], original: Point, limit: float,
                     resampling: Resampling) -> Optional[Tuple[float, float]]:
    """The interval of :func:`best_cr` under the resampling (a resample where no point meets the
    limit counts as 1x), or None when a point lacks its per-input correctness."""
    if not _resolvable([original, *points], resampling):
        return None
    acc = resampling.accuracies(points)  # [P, B]
    base = resampling.accuracies([original])[0]  # [B]
    cr = np.array([p["bitops_cr"] for p in points])[:, None]
    best = np.where(base[None, :] - acc <= limit + 1e-9, cr, 1.0).max(axis=0)
    return resampling.interval(best)


def _resolvable(points: Sequence[Point], resampling: Optional[Resampling]) -> bool:
    return resampling is not None and all(isinstance(p.get("correct"), str) for p in points)


def _by_seed(points: Sequence[Point]) -> Dict[int, List[Point]]:
    out: Dict[int, List[Point]] = {}
    for p in points:
        out.setdefault(int(p.get("seed", 0)), []).append(p)
    return out


@dataclass
class PairEvidence:
    """Both orders of a pair: their points, the best BitOpsCR per loss limit, and the verdict.

    ``margin`` (pp) is the mean accuracy gap between the fronts of ``first`` and ``second``
    (see :func:`front_gap`; with several seeds, its mean over them), positive when ``first`` (the
    pair as written) is better; ``interval``: its confidence interval (None when the points do
    not carry their per-input correctness); ``winner`` is the better order when the verdict is
    decisive, else None (a tie). ``resampled``: the margin under every bootstrap resample.
    """

    pair: str
    points: Dict[str, List[Point]]
    best: Dict[str, Dict[str, Optional[float]]]
    area: float
    margin: float
    decisive: bool
    winner: Optional[str]
    limit_votes: Dict[str, int]
    interval: Optional[Tuple[float, float]] = None
    confidence: float = CONFIDENCE
    seeds: int = 1
    resampled: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def edge(self) -> Optional[Tuple[str, str]]:
        """``(before, after)`` of the decisive verdict, or None for a tie."""
        return (self.winner[0], self.winner[1]) if self.winner else None

    def verdict(self) -> str:
        sign = -1 if self.winner and self.winner != self.pair else 1
        shown = ""
        if self.interval:
            low, high = sorted((sign * self.interval[0], sign * self.interval[1]))
            shown = f", {100 * self.confidence:.0f} % interval [{low:+.2f}, {high:+.2f}]"
        if self.winner:
            return f"{self.winner[0]} before {self.winner[1]} (margin {abs(self.margin):.2f} pp{shown}, decisive)"
        return f"tie (margin {self.margin:+.2f} pp for {self.pair}{shown})"

    def to_dict(self) -> Dict[str, Any]:
        return {"pair": self.pair, "winner": self.winner, "decisive": self.decisive, "margin": self.margin,
                "interval": list(self.interval) if self.interval else None, "seeds": self.seeds,
                "area": self.area, "limit_votes": self.limit_votes,
                "best_cr": {k: v for k, v in self.best.items()},
                "fronts": {k: pareto_front(v) for k, v in self.points.items()}, "points": self.points}


def compare(pair: str, ab: Sequence[Point], ba: Sequence[Point], original_accuracy: float,
            limits: Sequence[float] = LIMITS, tie_threshold: float = TIE_THRESHOLD, *,
            resampling: Optional[Resampling] = None, against: Optional[str] = None) -> PairEvidence:
    """The verdict of ``pair`` ("AB") from the points of AB and of BA.

    Decisive when the mean gap between the fronts is at least ``tie_threshold`` pp, the best
    BitOpsCR under the loss limits does not favour the other order in more limits (a limit
    counts for an order whose best BitOpsCR is over 5 % higher, or that alone meets it), and,
    when the points carry their per-input correctness and a ``resampling`` is given, the
    margin's confidence interval excludes a tie (0); otherwise a tie. Points of several seeds
    (``seed``) are compared seed by seed: the margin is the mean of theirs, the votes their sum.
    ``against``: the name of the second sequence when it is not the pair reversed (a repetition
    check: "DD" against "D").
    """
    first, second = pair, against or pair[::-1]
    ab_seeds, ba_seeds = _by_seed(ab), _by_seed(ba)
    seeds = sorted(set(ab_seeds) & set(ba_seeds)) or [0]
    votes = {first: 0, second: 0}
    best: Dict[str, Dict[str, Optional[float]]] = {}
    areas, margins = [], []
    for s in seeds:
        a_pts, b_pts = ab_seeds.get(s, list(ab)), ba_seeds.get(s, list(ba))
        for limit in limits:
            x, y = best_cr(a_pts, original_accuracy, limit), best_cr(b_pts, original_accuracy, limit)
            if s == seeds[0]:
                best[_limit_key(limit)] = {first: x, second: y}
            if x is not None and (y is None or x > 1.05 * y):
                votes[first] += 1
            elif y is not None and (x is None or y > 1.05 * x):
                votes[second] += 1
        area, margin = front_gap(a_pts, b_pts)
        areas.append(area)
        margins.append(margin)
    area, margin = sum(areas) / len(areas), sum(margins) / len(margins)
    resampled = interval = None
    if _resolvable(list(ab) + list(ba), resampling):
        per_seed = np.stack([resampled_gaps(ab_seeds.get(s, ab), ba_seeds.get(s, ba),
                                             resampling.accuracies(ab_seeds.get(s, ab)),
                                             resampling.accuracies(ba_seeds.get(s, ba))) for s in seeds])
        resampled = resampling.over_seeds(per_seed)
        interval = resampling.interval(resampled)
    leader, other = (first, second) if margin > 0 else (second, first)
    decisive = abs(margin) >= tie_threshold and votes[other] <= votes[leader]
    if interval is not None:
        decisive = decisive and (interval[0] > 0 or interval[1] < 0)
    return PairEvidence(pair, {first: list(ab), second: list(ba)}, best, area, margin, decisive,
                        leader if decisive else None, votes, interval,
                        resampling.confidence if resampling else CONFIDENCE, len(seeds), resampled)
