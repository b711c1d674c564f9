"""Order search: derive the order of compression methods from pairwise experiments.

For every pair of the chosen methods both orders (AB and BA) are run over a grid of each
method's strength, every run fine-tuned as in :func:`~ordercomp.pipeline.compress`. Each run is
an (accuracy, BitOps) point, or one point per threshold when the model has exits, measured on
held-out data with each input's answer. The Pareto fronts of AB and BA in the (accuracy,
BitOpsCR) plane give a verdict per pair, with a bootstrap interval for its margin; the decisive
verdicts form a directed graph whose topological sorts are the orders the evidence supports
(the paper's method: Shen et al., "Order of Compression", AAAI 2025), and the resamples say how
sure that order is. The paper's insertion and repetition checks run beside.

A run is a chain of steps ``(letter, strength)``; a chain continues from the saved model of
its prefix (every "A then ..." run starts from one A result), finished runs are cached as JSON
keyed by a hash of (model, config, chain) so an interrupted search resumes, and independent
runs go to parallel worker processes.

The package, one concern per module (imports point down this list, never up):

- :mod:`.api`: :func:`search_order` and :func:`write_search_report`;
- :mod:`.plan`: :class:`SearchPlan` and the Table-1 comparison of full sequences;
- :mod:`.graph`: the order graph, cycles broken at their weakest edge;
- :mod:`.executor`: the cache of finished runs and the pool of worker processes;
- :mod:`.runners`: :class:`RunSpec`, :class:`CompressRunner`, :class:`TorchrunRunner`;
- :mod:`.evidence`: Pareto fronts, best BitOpsCR under loss limits, :func:`compare`;
- :mod:`.grid`: the methods, :class:`SearchGrid`, ``PRESETS``, the steps and chains of runs.

The command line (``ordercomp search-order``) lives in :mod:`ordercomp.cli.search_order`.
"""

from __future__ import annotations

from .api import search_order, write_search_report
from .evidence import (CONFIDENCE, LIMITS, RESAMPLES, TIE_THRESHOLD, PairEvidence, Resampling, best_cr,
                       best_cr_interval, compare, front_gap, pareto_front)
from .graph import order_confidence, order_graph
from .grid import METHODS, PRESETS, SearchGrid
from .plan import SearchPlan, format_sequence_table, sequence_table
from .runners import CompressRunner, RunSpec, TorchrunRunner

__all__ = [
    "SearchGrid", "SearchPlan", "PairEvidence", "RunSpec", "CompressRunner", "search_order",
    "pareto_front", "best_cr", "front_gap", "compare", "order_graph", "sequence_table",
    "format_sequence_table", "TorchrunRunner", "LIMITS", "TIE_THRESHOLD", "PRESETS", "METHODS",
    "write_search_report", "Resampling", "best_cr_interval", "order_confidence", "CONFIDENCE", "RESAMPLES",
]
