"""The search itself: :func:`search_order` runs the pair, insertion and sequence stages, and
:func:`write_search_report` writes what it found (JSON, Markdown table, summary, plots)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checkpoint, plots
from ..checks import integer, number
from ..errors import ConfigError
from ..pipeline import CompressConfig, check_inputs, fingerprint
from ..pipeline.budget import LADDER_KEYS
from .evidence import LIMITS, TIE_THRESHOLD, PairEvidence, Point, compare, pareto_front
from .executor import _Executor
from .graph import order_graph
from .grid import METHODS, SearchGrid, _check_methods, _sequence_chains
from .plan import SearchPlan, _points, _sequences, format_sequence_table, sequence_table
from .runners import CompressRunner, RunSpec

__all__ = ["search_order", "write_search_report"]


def _config(config, epochs, max_batches, device, progress) -> CompressConfig:
    """``config`` (a CompressConfig, a dict, a file, or None for the defaults) with the shortcuts applied."""
    if isinstance(config, (str, Path)):
        config = CompressConfig.load(config)
    elif isinstance(config, dict):
        config = CompressConfig.from_dict(config)
    return (config or CompressConfig()).with_shortcuts(
        epochs=epochs, max_batches=max_batches, device=str(device) if device is not None else None,
        progress=progress)


def _check_arguments(methods, budget, workers, tie_threshold, limits, sequences, config,
                     shortcuts: Dict[str, Any]) -> Tuple[str, SearchGrid, Tuple[float, ...], CompressConfig]:
    """The methods (upper case), the grid, the limits and the config, after checking every argument
    (before any run, so a mistake does not surface hours into a search)."""
    methods = _check_methods(methods)
    grid = SearchGrid.from_budget(budget)
    integer("workers", workers, low=1)
    number("tie_threshold", tie_threshold, low=0, finite=False)
    limits = tuple(float(v) for v in limits)
    if not limits or any(v < 0 for v in limits):
        raise ConfigError(f"limits must be a non-empty list of accuracy losses >= 0 (pp), got {limits!r}")
    config = _config(config, **shortcuts)
    _sequences(sequences, methods, methods, [methods])
    return methods, grid, limits, config


def _run_key(model: nn.Module, config: CompressConfig) -> str:
    """The hash of (model, config) that keys the cache of runs; the device, the step order and the
    progress bars leave a run's result unchanged, so they are left out."""
    settings = config.to_dict()
    settings.pop("device")
    settings.pop("order")
    settings["train"].pop("progress")
    # as config version 1 wrote them, so that runs cached before the ladders moved to the stages stay found
    settings.pop("version")
    for section in settings.values():
        if isinstance(section, dict) and "ladders" in section and section["ladders"] is None:
            del section["ladders"]
    for key, (_, _, default) in LADDER_KEYS.items():
        if settings["budget"].get(key) is None:
            settings["budget"][key] = list(default)
    base = json.dumps({"model": fingerprint(model), "config": settings}, sort_keys=True, default=str)
    return hashlib.sha256(base.encode()).hexdigest()


def _picklable(runner, workers: int) -> None:
    """Worker processes receive the runner pickled: refuse one that is not, before any run."""
    try:
        pickle.dumps(runner)
    except Exception as exc:
        raise ConfigError(f"workers={workers} needs picklable loaders (or loader factories) and runner: {exc}") from exc


def _search_dir(out) -> Tuple[Path, Optional[tempfile.TemporaryDirectory]]:
    """``out`` (created), or a temporary directory (returned too, to be cleaned up) when it is None."""
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ordercomp-search-")
        return Path(tmp.name), tmp
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    return root, None


def _pair_stage(executor: _Executor, methods: str, grid: SearchGrid, limits: Tuple[float, ...],
                tie_threshold: float) -> Tuple[float, Dict[str, PairEvidence]]:
    """Runs the original model and both orders of every pair; returns its accuracy and each pair's evidence."""
    pairs = ["".join(p) for p in itertools.combinations(methods, 2)]
    pair_chains = {o: [(x, y) for x in grid.steps(o[0]) for y in grid.steps(o[1])]
                   for p in pairs for o in (p, p[::-1])}
    executor.run([()] + [c for cs in pair_chains.values() for c in cs])
    original_accuracy = executor.results[()]["points"][0]["accuracy"]
    evidence = {p: compare(p, _points(executor.results, pair_chains[p]),
                           _points(executor.results, pair_chains[p[::-1]]), original_accuracy, limits,
                           tie_threshold) for p in pairs}
    return original_accuracy, evidence


def _insertion_checks(executor: _Executor, methods: str, grid: SearchGrid, edges, original_accuracy: float,
                      limits: Tuple[float, ...], tie_threshold: float) -> List[Dict[str, Any]]:
    """For every decisive A->B and every other method C: A C B against B C A."""
    checks = []
    for (a, b) in sorted(edges):
        for c in methods:
            if c in (a, b):
                continue
            kept, flipped = a + c + b, b + c + a
            chains = {s: _sequence_chains(s, grid) for s in (kept, flipped)}
            executor.run([ch for cs in chains.values() for ch in cs])
            e = compare(kept, _points(executor.results, chains[kept]), _points(executor.results, chains[flipped]),
                        original_accuracy, limits, tie_threshold)
            checks.append({"first": a, "inserted": c, "second": b, "margin": e.margin,
                           "verdict": "kept" if e.winner == kept else "reversed" if e.winner else "tie",
                           "evidence": e.to_dict()})
    return checks


def _sequence_stage(executor: _Executor, sequences: List[str], grid: SearchGrid) -> Dict[str, List[Point]]:
    """Runs every full sequence of the table over the grid; returns each sequence's points."""
    seq_chains = {s: _sequence_chains(s, grid) for s in sequences}
    executor.run([c for cs in seq_chains.values() for c in cs])
    return {s: _points(executor.results, cs) for s, cs in seq_chains.items()}


def search_order(
    model: nn.Module,
    train_loader,
    val_loader,
    methods: str = METHODS,
    budget: Union[SearchGrid, str, int, None] = "small",
    *,
    config: Union[CompressConfig, Dict, str, Path, None] = None,
    epochs: Optional[int] = None,
    max_batches: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    out: Union[str, Path, None] = None,
    workers: int = 1,
    sequences: Union[str, Sequence[str], None] = None,
    insertion: bool = False,
    tie_threshold: float = TIE_THRESHOLD,
    limits: Sequence[float] = LIMITS,
    runner: Optional[Callable[[RunSpec], List[Point]]] = None,
    progress: bool = False,
    verbose: bool = True,
) -> SearchPlan:
    """Finds the order of ``methods`` (any 2 to 4 of "DPQE") for ``model`` from pairwise experiments.

    Every pair runs in both orders over the grid ``budget`` (a :class:`SearchGrid`, a preset name
    of ``PRESETS``, or strengths per method), each run through :func:`compress` with ``config``
    (``epochs`` / ``max_batches`` / ``device`` as there). ``out``: the search directory (cache of
    finished runs, saved prefix models, plots, table, JSON); rerunning with the same ``out``
    resumes. ``workers``: parallel worker processes ("spawn"); the loaders (or zero-argument
    factories of them) and a custom ``runner`` must then be picklable. ``sequences``: the full
    orders of the table (``None``: the order found, plus its reverse for two methods; ``"all"``;
    ``"consistent"``; ``"D-first"``-style; or a list). ``insertion``: also run A[C]B against B[C]A
    for every decisive A->B. ``runner(run_spec) -> points`` replaces the compress() runs (tests plant
    results with it); each point is a dict with ``accuracy`` (%) and ``bitops_cr``, and the empty
    chain must give the original model's point. ``progress``: progress bars inside each run;
    ``verbose``: a line per finished run, the run count and a time estimate.
    """
    shortcuts = dict(epochs=epochs, max_batches=max_batches, device=device, progress=progress)
    methods, grid, limits, config = _check_arguments(methods, budget, workers, tie_threshold, limits, sequences,
                                                     config, shortcuts)
    log = (lambda line: print(line, flush=True)) if verbose else (lambda line: None)

    model = copy.deepcopy(model).cpu()
    base_key = _run_key(model, config)
    runner = runner if runner is not None else CompressRunner(model, train_loader, val_loader, config)
    if isinstance(runner, CompressRunner):  # the probe before any run: the model, its data, the directory
        train, val, calibration = runner._data()
        check_inputs(model, {"train_loader": train, "val_loader": val, "calibration_loader": calibration}, config,
                     out=out)
    if workers > 1:
        _picklable(runner, workers)
    keep_below = max(len(methods), 3 if insertion else 0)
    root, tmp = _search_dir(out)
    executor = _Executor(runner, base_key, root, workers, keep_below, log)
    try:
        original_accuracy, evidence = _pair_stage(executor, methods, grid, limits, tie_threshold)
        graph = order_graph(methods, evidence)
        order = graph["orders"][0]
        checks = []
        if insertion:
            checks = _insertion_checks(executor, methods, grid, graph["edges"], original_accuracy, limits,
                                       tie_threshold)
        seq_points = _sequence_stage(executor, _sequences(sequences, methods, order, graph["orders"]), grid)
        plan = SearchPlan(
            methods=methods, order=order, unique=graph["unique"], orders_consistent=graph["orders"],
            pairwise=evidence, cycles=graph["cycles"], table=sequence_table(seq_points, original_accuracy, limits),
            original_accuracy=original_accuracy, grid=grid, tie_threshold=float(tie_threshold), limits=limits,
            insertion=checks, sequence_points=seq_points,
            runs={"total": len(executor.results), "executed": executor.calls, "dir": str(root) if out else None},
            out=Path(out) if out is not None else None,
        )
        for c in plan.cycles:
            log(f"search: cycle {c['cycle']} among the verdicts; dropped its weakest edge {c['weakest']} "
                f"(margin {c['margin']:.2f} pp)")
        if out is not None:
            write_search_report(plan, root)
        return plan
    finally:
        executor.close()
        if tmp is not None:
            tmp.cleanup()


def _plot_pair(evidence: PairEvidence, original_accuracy: float, path: Path) -> Path:
    """AB against BA with both Pareto fronts, titled with the verdict."""
    fronts = {order: pareto_front(pts) for order, pts in evidence.points.items()}
    title = f"{evidence.pair} vs {evidence.pair[::-1]}: {evidence.verdict()}"
    return plots.plot_pair(evidence.points, fronts, original_accuracy, title, path)


def _plot_graph(plan: SearchPlan, path: Path) -> Path:
    """An arrow per decisive verdict labelled with its margin, dropped cycle edges dashed, ties dotted."""
    links = []
    for e in plan.pairwise.values():
        a, b = e.edge or tuple(e.pair)
        links.append((a, b, f"{abs(e.margin):.2f}" if e.edge else "tie", e.edge is not None))
    dropped = {tuple(c["weakest"].split("->")) for c in plan.cycles}
    title = f"order {plan.order} ({'unique' if plan.unique else 'not unique'}); margins in pp"
    return plots.plot_graph(plan.methods, links, dropped, title, path)


def write_search_report(plan: SearchPlan, out) -> Dict[str, Path]:
    """search.json (every point), table.md, summary.txt, pairs/<AB>.png and order_graph.png in ``out``."""
    out = Path(out)
    paths = {"json": checkpoint.write_json(out / "search.json", plan.to_dict()),
             "table": checkpoint.write_text(out / "table.md", "# Best BitOpsCR under accuracy-loss limits\n\n"
                                            + format_sequence_table(plan.table, plan.limits) + "\n"),
             "summary": checkpoint.write_text(out / "summary.txt", str(plan) + "\n"),
             "graph": _plot_graph(plan, out / "order_graph.png")}
    for pair, e in plan.pairwise.items():
        paths[f"pair_{pair}"] = _plot_pair(e, plan.original_accuracy, out / "pairs" / f"{pair}.png")
    return paths
