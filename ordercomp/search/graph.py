"""The order graph: the decisive verdicts as edges, cycles broken at their weakest edge, the consistent orders."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, List, Optional, Tuple

from ..stages import letters
from .evidence import PairEvidence

__all__ = ["order_graph", "order_confidence"]


def _find_cycle(nodes: str, edges: Dict[Tuple[str, str], float]) -> Optional[List[str]]:
    """A cycle of ``edges`` as its nodes with the first repeated at the end, or None (depth-first)."""
    state = {n: 0 for n in nodes}
    stack: List[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for (a, b) in sorted(edges):
            if a != n:
                continue
            if state[b] == 1:
                return stack[stack.index(b):] + [b]
            if state[b] == 0:
                found = visit(b)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in nodes:
        if state[n] == 0:
            found = visit(n)
            if found:
                return found
    return None


def order_graph(methods: str, evidence: Dict[str, PairEvidence]) -> Dict[str, Any]:
    """Sorts ``methods`` by the decisive verdicts.

    Returns ``edges`` (kept ``(before, after) -> margin``), ``cycles`` (each with its nodes, its
    weakest edge and that edge's margin; the weakest edge is dropped and the search goes on until
    no cycle is left), ``orders`` (every order consistent with the kept edges, best first by the
    sum of margins it agrees with) and ``unique``.
    """
    edges = {e.edge: abs(e.margin) for e in evidence.values() if e.edge}
    cycles = []
    while True:
        cycle = _find_cycle(methods, edges)
        if cycle is None:
            break
        cycle_edges = list(zip(cycle, cycle[1:]))
        weakest = min(cycle_edges, key=lambda e: (edges[e], e))
        cycles.append({"cycle": "->".join(cycle), "weakest": "->".join(weakest), "margin": edges[weakest]})
        del edges[weakest]
    orders = ["".join(p) for p in itertools.permutations(methods)
              if all(p.index(a) < p.index(b) for a, b in edges)]

    def score(order):
        total = 0.0
        for e in evidence.values():
            a, b = e.pair
            total += e.margin if order.index(a) < order.index(b) else -e.margin
        return total

    orders.sort(key=lambda o: (-score(o), [letters().index(c) for c in o]))
    return {"edges": edges, "cycles": cycles, "orders": orders, "unique": len(orders) == 1}


def order_confidence(methods: str, evidence: Dict[str, PairEvidence], order: str,
                     tie_threshold: float) -> Optional[float]:
    """The share of bootstrap resamples whose order graph sorts to ``order`` first: in each, a
    pair's verdict is decisive when its resampled margin is at least ``tie_threshold`` pp. None
    when a pair has no resampled margins (its points carry no per-input correctness)."""
    if not evidence or any(e.resampled is None for e in evidence.values()):
        return None
    resamples = len(next(iter(evidence.values())).resampled)
    same = 0
    for b in range(resamples):
        drawn = {}
        for pair, e in evidence.items():
            margin = float(e.resampled[b])
            decisive = abs(margin) >= tie_threshold
            winner = (pair if margin > 0 else pair[::-1]) if decisive else None
            drawn[pair] = dataclasses.replace(e, margin=margin, decisive=decisive, winner=winner, resampled=None)
        same += order_graph(methods, drawn)["orders"][0] == order
    return same / resamples
