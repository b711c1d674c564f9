"""What a search found (:class:`SearchPlan`) and the Table-1 comparison of full sequences.

Also the helpers that turn the search's arguments and cached runs into the sequences and
points the plan is built from.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import ConfigError
from .evidence import LIMITS, TIE_THRESHOLD, PairEvidence, Point, Resampling, _by_seed, _limit_key, best_cr, best_cr_interval
from .grid import Chain, SearchGrid

__all__ = ["SearchPlan", "sequence_table", "format_sequence_table"]


def sequence_table(points: Dict[str, Sequence[Point]], original_accuracy: float,
                   limits: Sequence[float] = LIMITS, resampling: Optional[Resampling] = None,
                   original: Optional[Point] = None) -> List[Dict[str, Any]]:
    """One row per sequence: the best BitOpsCR under each accuracy-loss limit and a rank.

    Sequences are ranked by the geometric mean of their best BitOpsCR over the limits (a limit
    a sequence cannot meet counts as 1x); equal scores share a rank, as in the paper's Table 1.
    With several seeds, a row is seed 0's; with a ``resampling`` and the ``original`` point
    (both with per-input correctness), each best BitOpsCR has its bootstrap interval (``interval``).
    """
    rows = []
    for sequence, pts in points.items():
        first = _by_seed(pts)
        first = first[min(first)] if first else []
        best = {_limit_key(limit): best_cr(first, original_accuracy, limit) for limit in limits}
        score = sum(math.log(v) for v in best.values() if v) / len(limits)
        row = {"sequence": sequence, "best_cr": best, "score": math.exp(score), "points": len(pts)}
        if original is not None and resampling is not None:
            intervals = {_limit_key(limit): best_cr_interval(first, original, limit, resampling) for limit in limits}
            if all(v is not None for v in intervals.values()):
                row["interval"] = {k: list(v) for k, v in intervals.items()}
        rows.append(row)
    rows.sort(key=lambda r: (-round(r["score"], 6), r["sequence"]))
    for i, row in enumerate(rows):
        same = i and round(rows[i - 1]["score"], 6) == round(row["score"], 6)
        row["rank"] = rows[i - 1]["rank"] if same else i + 1
    return rows


def format_sequence_table(rows: Sequence[Dict[str, Any]], limits: Sequence[float] = LIMITS) -> str:
    """The sequence table as Markdown: best BitOpsCR under each accuracy-loss limit (with its
    95 % interval when the row has one; "-" where no point meets the limit, an interval end of
    "-" where some resamples meet it with none)."""
    header = ["rank", "order"] + [f"loss <= {limit:g} pp" for limit in limits]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["rank"]), r["sequence"]]
        for limit in limits:
            key = _limit_key(limit)
            interval = (r.get("interval") or {}).get(key)
            shown = f" [{_bound(interval[0])}, {_bound(interval[1])}]" if interval and interval[1] > 1.0 else ""
            cells.append(_cr(r["best_cr"][key]) + shown)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cr(value: Optional[float]) -> str:
    return f"{value:.1f}x" if value else "-"


def _bound(value: float) -> str:
    """An interval's end: "-" where the resamples meet the limit with no compressed point (1x)."""
    return f"{value:.1f}" if value > 1.0 else "-"


def _interval(check: Dict[str, Any]) -> str:
    return f", interval [{check['interval'][0]:+.2f}, {check['interval'][1]:+.2f}]" if check.get("interval") else ""


@dataclass
class SearchPlan:
    """What a search found.

    ``order``: the best order consistent with the evidence; ``unique``: whether it is the only
    one; ``orders_consistent``: all of them; ``pairwise``: per pair, a :class:`PairEvidence`;
    ``cycles``: cycles met among the verdicts with the weakest edge dropped from each;
    ``table``: rows of :func:`sequence_table`; ``insertion`` and ``repetition``: the paper's
    checks, each with its verdict, margin and interval; ``confidence``: the share of bootstrap
    resamples whose verdicts sort to ``order`` (None without per-input correctness); ``seeds``:
    how many seeds every run was repeated with.
    """

    methods: str
    order: str
    unique: bool
    orders_consistent: List[str]
    pairwise: Dict[str, PairEvidence]
    cycles: List[Dict[str, Any]]
    table: List[Dict[str, Any]]
    original_accuracy: float
    grid: SearchGrid
    tie_threshold: float = TIE_THRESHOLD
    limits: Tuple[float, ...] = LIMITS
    insertion: List[Dict[str, Any]] = field(default_factory=list)
    repetition: List[Dict[str, Any]] = field(default_factory=list)
    confidence: Optional[float] = None
    seeds: int = 1
    sequence_points: Dict[str, List[Point]] = field(default_factory=dict)
    runs: Dict[str, Any] = field(default_factory=dict)
    out: Optional[Path] = None

    def to_dict(self) -> Dict[str, Any]:
        """Everything as plain JSON-able values, every point included."""
        return {
            "methods": self.methods, "order": self.order, "unique": self.unique, "confidence": self.confidence,
            "seeds": self.seeds, "repetition": self.repetition,
            "orders_consistent": self.orders_consistent, "cycles": self.cycles,
            "original_accuracy": self.original_accuracy, "tie_threshold": self.tie_threshold,
            "limits": list(self.limits), "grid": self.grid.to_dict(),
            "pairwise": {k: v.to_dict() for k, v in self.pairwise.items()},
            "table": self.table, "insertion": self.insertion, "sequence_points": self.sequence_points,
            "runs": self.runs,
        }

    def __str__(self) -> str:
        sure = (f"; {100 * self.confidence:.0f} % of bootstrap resamples sort to it" if self.confidence is not None
                else "")
        lines = [f"order: {self.order} ({'unique' if self.unique else 'not unique'}; "
                 f"consistent with the evidence: {', '.join(self.orders_consistent)}{sure})",
                 f"original accuracy {self.original_accuracy:.2f} %; tie below {self.tie_threshold:g} pp", "",
                 "pairwise verdicts:"]
        for pair, e in self.pairwise.items():
            best = "; ".join(f"<= {k} pp: " + " vs ".join(_cr(v[o]) for o in e.points) for k, v in e.best.items())
            lines.append(f"  {pair} vs {pair[::-1]}: {e.verdict()}  [best BitOpsCR {best}]")
        for c in self.cycles:
            lines.append(f"cycle {c['cycle']}: dropped its weakest edge {c['weakest']} (margin {c['margin']:.2f} pp)")
        for ins in self.insertion:
            lines.append(f"insertion {ins['first']}[{ins['inserted']}]{ins['second']}: {ins['verdict']} "
                         f"(margin {ins['margin']:+.2f} pp{_interval(ins)})")
        for rep in self.repetition:
            lines.append(f"repetition {rep['repeated']} against {rep['once']}: {rep['verdict']} "
                         f"(margin {rep['margin']:+.2f} pp{_interval(rep)})")
        if self.table:
            lines += ["", "best BitOpsCR under accuracy-loss limits:", format_sequence_table(self.table, self.limits)]
        if self.out is not None:
            lines += ["", f"report: {self.out}"]
        return "\n".join(lines)


def _points(results: Dict[Chain, Dict[str, Any]], chains: Iterable[Chain]) -> List[Point]:
    """The points of the finished runs of ``chains``, each tagged with its run's key."""
    return [dict(p, run=results[c]["key"]) for c in chains for p in results[c]["points"]]


def _sequences(sequences, methods: str, order: str, consistent: List[str]) -> List[str]:
    """The full orders of the table that ``sequences`` (search_order's argument) names."""
    if sequences is None:
        return list(dict.fromkeys([order] + ([order[::-1]] if len(methods) == 2 else [])))
    if isinstance(sequences, str):
        if sequences == "all":
            return ["".join(p) for p in itertools.permutations(methods)]
        if sequences == "consistent":
            return list(consistent)
        if sequences.endswith("-first") and len(sequences) == 7 and sequences[0].upper() in methods:
            head = sequences[0].upper()
            return [head + "".join(p) for p in itertools.permutations(methods.replace(head, ""))]
        sequences = [sequences]
    out = []
    for s in sequences:
        s = s.upper() if isinstance(s, str) else s
        if not isinstance(s, str) or sorted(s) != sorted(methods):
            raise ConfigError(f"sequences must be 'all', 'consistent', 'X-first' (X one of {methods}) or orders "
                              f"that use each of {methods} once, got {s!r}")
        out.append(s)
    return list(dict.fromkeys(out))
