"""The accuracy budget's arithmetic: what a stage may spend, what fits, where a ladder's search
starts and goes next, and where a stage falls back to (see :mod:`.budget`)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["DEFAULT_SHARES", "Share", "fits", "fastest", "margin_floor", "next_level", "resolution",
           "smallest_part", "start_index", "step_backs", "weaker", "LATENCY_TIE"]

LATENCY_TIE = 0.05  # speed-ups within 5 % of the fastest are one speed: the timing noise of interleaved medians
# Each stage's part of the budget, by letter. E comes last and takes what the others leave: on the
# digits its thresholds down to 0.99 bought a median 1.41x for 0.03 pp, the next ones down to 0.95
# 1.21x for 0.27 pp more, so a part as large as the others' is spent where it buys least. Q, the
# stage before it, gets what E does not: D and P keep a quarter of the budget each, as when equal.
DEFAULT_SHARES = {"D": 1.0, "P": 1.0, "Q": 1.5, "E": 0.5}


def start_index(ladder: Sequence, value) -> int:
    """Where the search of a ladder starts from a stage's own strength ``value``: its index in the
    ladder, else the index of the level nearest to it (the lower index on a tie)."""
    if value in ladder:
        return list(ladder).index(value)
    return min(range(len(ladder)), key=lambda i: (abs(float(ladder[i]) - float(value)), i))


@dataclass(frozen=True)
class Share:
    """What one stage may spend: the model it gets lost ``spent`` pp; a run fits when its loss
    plus ``weight`` times its margin is within ``allowance`` (``spent + weight * (target - spent)``);
    it is within the whole budget when its loss plus all of its margin is within ``target``."""

    spent: float
    weight: float
    allowance: float
    target: float

    def upper(self, loss: float, margin: float) -> float:
        return loss + self.weight * margin

    def fits(self, loss: float, margin: float) -> bool:
        return fits(self.upper(loss, margin), self.allowance)

    def within_budget(self, loss: float, margin: float) -> bool:
        return fits(loss + margin, self.target)


def fastest(levels: Sequence[int], speedups: Dict[int, float]) -> int:
    """The weakest of ``levels`` (ladder indices) whose measured speed-up is within ``LATENCY_TIE`` of
    the fastest's: it spends the least of the budget for the same speed."""
    top = max(speedups[j] for j in levels)
    return min(j for j in levels if speedups[j] >= (1 - LATENCY_TIE) * top)


def fits(upper: float, allowance: float) -> bool:
    return upper <= allowance + 1e-9


def next_level(uppers: Dict[int, float], allowance: float, n: int) -> int:
    """The unprobed level next to the boundary: above the strongest one within, else the weakest."""
    within = [j for j, v in uppers.items() if fits(v, allowance)]
    target = max(within) + 1 if within else 0
    free = [j for j in range(n) if j not in uppers]
    return min(free, key=lambda j: (abs(j - target), -j))


def weaker(settings: Sequence[Tuple[str, Sequence]], tried: Sequence[Dict[str, Any]],
           kept: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """One level weaker than the weakest of the ``tried`` strengths (per setting, the lowest ladder
    index any of them had), on the last of ``settings`` not yet at its weakest; None when all are.
    Settings outside ``settings`` keep their ``kept`` values."""
    index = {name: min(start_index(ladder, t[name]) for t in tried) for name, ladder in settings}
    for name, ladder in reversed(settings):
        if index[name] > 0:
            index[name] -= 1
            return dict(kept, **{n: levels[index[n]] for n, levels in settings})
    return None


def step_backs(runs: Sequence[Dict[str, Any]], share: Share, anchor: Dict[str, Any], skip: Sequence[Dict[str, Any]],
               cost: str = "bitops") -> List[Dict[str, Any]]:
    """Where a stage steps back to when its choice's full run is refused: the strengths of the probes
    among ``runs`` whose estimates fit ``share`` and that buy more than the ``anchor`` run, strongest
    first (BitOpsCR; with ``cost="latency"`` the measured speed-up), but those in ``skip``."""
    def bought(run):
        return run.get("speedup", math.nan) if cost == "latency" else run["bitops_cr"]

    fitting = [r for r in runs if r["kind"] == "probe" and "estimated_loss" in r and r["strength"] not in skip
               and bought(r) > bought(anchor) and share.fits(r["estimated_loss"], r["estimated_margin"])]
    return [dict(r["strength"]) for r in sorted(fitting, key=lambda r: -bought(r))]


def smallest_part(target: float, shares: Sequence[float]) -> float:
    """The smallest part ``target * s_i / sum(s)`` of the budget a stage of the plan with these
    ``shares`` is planned to spend, the last stage left out (it takes what the others leave: its
    bound is the whole budget's); a plan of one stage has the whole ``target``."""
    if not shares:
        return 0.0
    return target * min(shares[:-1] or shares) / sum(shares)


def resolution(smallest: float, n: int, confidence: float,
               carved: Optional[Tuple[int, int]] = None) -> Optional[Dict[str, Any]]:
    """Whether ``n`` calibration inputs resolve shares of ``smallest`` pp (*S*) at ``confidence``: a
    stage that spends exactly *S*, every changed answer a loss, has the margin ``100 z sqrt(q (1 -
    q) / n)`` (q = S / 100). None when that is <= *S*; else the calibration size that would do
    (the smallest n whose margin is <= S) and, with a ``carved`` split, the
    ``calibration_fraction`` that gives it."""
    z = statistics.NormalDist().inv_cdf(confidence)
    q = min(smallest / 100, 1.0)
    margin = 100 * z * math.sqrt(q * (1 - q) / n) if n else math.inf
    if smallest <= 0 or margin <= smallest:
        return None
    needed = math.ceil(z * z * (1 - q) * 100 / smallest - 1e-9)
    message = (f"the calibration split of {n} inputs cannot resolve shares of {smallest:.3g} pp at confidence "
               f"{confidence:g}: a stage that spends exactly its share has a margin of "
               f"{margin:.2f} pp; about {needed} calibration inputs would resolve it")
    fraction, message = _carved(needed, carved, message)
    return {"calibration_inputs": n, "smallest_share": smallest, "margin": margin, "needed": needed,
            "calibration_fraction": fraction, "message": message}


def margin_floor(margin: float, changed: float, n: int, smallest: float, confidence: float,
                 carved: Optional[Tuple[int, int]] = None) -> Optional[Dict[str, Any]]:
    """Whether the first stage's model as configured, which answers the share ``changed`` of the
    ``n`` calibration inputs differently from the original, already has a ``margin`` (pp) above the
    smallest share ``smallest``: then every later model's bound starts there (they change more
    answers), and the budget buys little. None when not; else the calibration size that would bring
    that margin to ``smallest`` (``n (margin / smallest)^2``, as a margin shrinks with sqrt(n)), and
    with a ``carved`` split the ``calibration_fraction`` that gives it."""
    if smallest <= 0 or margin <= smallest:
        return None
    needed = math.ceil(n * (margin / smallest) ** 2 - 1e-9)
    message = (f"the first stage's model as configured answers {100 * changed:.1f} % of the {n} calibration inputs "
               f"differently from the original: its margin alone is {margin:.2f} pp at confidence {confidence:g}, "
               f"more than a stage's share of {smallest:.3g} pp, and the later models change more answers, so the "
               f"budget buys little; about {needed} calibration inputs would bring that margin to {smallest:.3g} pp")
    fraction, message = _carved(needed, carved, message)
    return {"calibration_inputs": n, "changed": changed, "margin": margin, "smallest_share": smallest,
            "needed": needed, "calibration_fraction": fraction, "message": message}


def _carved(needed: int, carved: Optional[Tuple[int, int]], message: str) -> Tuple[Optional[float], str]:
    """The ``calibration_fraction`` of a split ``carved`` from the training data (``(training
    samples, calibration samples)``) that gives ``needed`` inputs, and ``message`` saying it."""
    if carved is None:
        return None, message
    total = sum(carved)
    fraction = math.ceil(100 * needed / total) / 100
    if fraction >= 1:
        return None, message + f"; even all {total} training samples would not suffice"
    return fraction, message + f" (calibration_fraction {fraction:g} of the {total} training samples)"
