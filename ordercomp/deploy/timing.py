"""Latency of deployed models: interleaved rounds, per-call medians, the same inputs for every variant.

Each round runs every variant on every batch size in turn, so drift of a shared machine (another
process, frequency changes) falls on all variants alike; the first round only warms up. Inputs are
real held-out inputs taken in order, so early exits see the mix of easy and hard inputs they
would in use.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Sequence

import numpy as np

from .. import checks

__all__ = ["time_variants", "calls_per_round"]


def calls_per_round(batch: int) -> int:
    """Enough calls for a stable median without letting large batches dominate the run."""
    return max(3, 64 // batch)


def time_variants(variants: Dict[str, Callable[[np.ndarray], object]], inputs: np.ndarray,
                  batch_sizes: Sequence[int] = (1, 64), rounds: int = 8) -> Dict[str, Dict[int, float]]:
    """``{variant: {batch size: median milliseconds per call}}`` over ``rounds`` interleaved rounds."""
    checks.integer("rounds", rounds, 1)
    for b in batch_sizes:
        checks.integer("batch size", b, 1, len(inputs))
    times: Dict[str, Dict[int, list]] = {name: {b: [] for b in batch_sizes} for name in variants}
    offset = 0
    for r in range(rounds + 1):
        for b in batch_sizes:
            starts = [(offset + i * b) % (len(inputs) - b + 1) for i in range(calls_per_round(b))]
            offset += 1
            for name, run in variants.items():
                for s in starts:
                    x = inputs[s:s + b]
                    t = time.perf_counter()
                    run(x)
                    if r:
                        times[name][b].append(time.perf_counter() - t)
    return {name: {b: 1e3 * statistics.median(v) for b, v in per.items()} for name, per in times.items()}
