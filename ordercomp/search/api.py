"""The search itself: :func:`search_order` runs the pair stage, the paper's insertion and
repetition checks and the sequence stage (each run under every seed), and
:func:`write_search_report` writes what it found (JSON, Markdown table, summary, plots)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checkpoint, plots
from ..checks import integer, number
from ..errors import ConfigError, MissingDependencyError
from ..pipeline import CompressConfig, check_inputs, fingerprint
from ..pipeline.budget import LADDER_KEYS
from .. import stats
from .evidence import LIMITS, TIE_THRESHOLD, PairEvidence, Point, Resampling, compare, pareto_front
from .executor import _Executor
from .graph import order_confidence, order_graph
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


def _check_arguments(methods, grid, workers, tie_threshold, limits, sequences, config, shortcuts: Dict[str, Any],
                     seeds, executor, address) -> Tuple[str, SearchGrid, Tuple[float, ...], CompressConfig]:
    """The methods (upper case), the grid, the limits and the config, after checking every argument
    (before any run, so a mistake does not surface hours into a search)."""
    integer("seeds", seeds, low=1)
    if executor not in ("local", "ray"):
        raise ConfigError(f"executor must be 'local' or 'ray', got {executor!r}")
    if address is not None and executor != "ray":
        raise ConfigError("address names a Ray cluster: it needs executor='ray'")
    methods = _check_methods(methods)
    grid = SearchGrid.of(grid)
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
    settings.pop("search", None)  # how a search is run, not how each of its runs is
    settings["train"].pop("progress")
    # as config version 1 wrote them, so that runs cached before the ladders moved to the stages stay found
    settings.pop("version")
    for section in settings.values():
        if isinstance(section, dict) and "ladders" in section and section["ladders"] is None:
            del section["ladders"]
    for key, (_, _, default) in LADDER_KEYS.items():
        if settings["budget"].get(key) is None:
            settings["budget"][key] = list(default)
    # points measured on the held-out data with each input's correctness (runs cached before, whose
    # points were calibration accuracies, are not mixed in)
    base = json.dumps({"model": fingerprint(model), "config": settings, "points": "held-out"}, sort_keys=True,
                      default=str)
    return hashlib.sha256(base.encode()).hexdigest()


def _picklable(runner, workers: int) -> None:
    """Worker processes receive the runner pickled: refuse one that is not, before any run."""
    try:
        pickle.dumps(runner)
    except Exception as exc:
        raise ConfigError(f"workers={workers} needs picklable loaders (or loader factories) and runner: {exc}") from exc


def _start_ray(address: Optional[str]) -> bool:
    """Connects to the Ray cluster at ``address`` (or the one this process is connected to, else
    a local one); True when it was started here (and is to be stopped after the search)."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("executor='ray' needs Ray: pip install 'ordercomp[cluster]'") from None
    if ray.is_initialized():
        return False
    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    return True


def _search_dir(out) -> Tuple[Path, Optional[tempfile.TemporaryDirectory]]:
    """``out`` (created), or a temporary directory (returned too, to be cleaned up) when it is None."""
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ordercomp-search-")
        return Path(tmp.name), tmp
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    return root, None


class _Seeds:
    """The runs of a search under each of its seeds: one executor per seed (seed 0 keeps the
    cache keys of a search without seeds), every chain run under each."""

    def __init__(self, executors: List[_Executor]):
        self.executors = executors

    def run(self, chains) -> None:
        chains = list(chains)
        for executor in self.executors:
            executor.run(chains)

    def points(self, chains) -> List[Point]:
        """The points of ``chains`` under every seed, each tagged with its seed (a runner's own tag kept)."""
        chains = list(chains)
        return [dict(p, seed=p.get("seed", e.seed)) for e in self.executors for p in _points(e.results, chains)]

    @property
    def runs(self) -> Dict[str, int]:
        return {"total": sum(len(e.results) for e in self.executors), "executed": sum(e.calls for e in self.executors)}

    def close(self) -> None:
        for executor in self.executors:
            executor.close()


class _Judge:
    """Compares two sets of chains on the search's held-out points with its limits, tie threshold
    and resampling."""

    def __init__(self, runs: _Seeds, grid: SearchGrid, limits: Tuple[float, ...], tie_threshold: float):
        self.runs, self.grid, self.limits, self.tie_threshold = runs, grid, limits, tie_threshold
        runs.run([()])
        self.original = runs.points([()])[0]
        self.original_accuracy = self.original["accuracy"]
        correct = self.original.get("correct")
        self.resampling = (Resampling(len(stats.unpack_correct(correct)), len(runs.executors))
                           if isinstance(correct, str) else None)

    def sequences(self, *sequences: str) -> Dict[str, List[Point]]:
        """Runs every chain of each sequence over the grid; each sequence's points."""
        chains = {s: _sequence_chains(s, self.grid) for s in sequences}
        self.runs.run([c for cs in chains.values() for c in cs])
        return {s: self.runs.points(cs) for s, cs in chains.items()}

    def compare(self, first: str, second: str, points: Dict[str, List[Point]],
                against: Optional[str] = None) -> PairEvidence:
        return compare(first, points[first], points[second], self.original_accuracy, self.limits,
                       self.tie_threshold, resampling=self.resampling, against=against)


def _checked_runner(runner, model: nn.Module, train_loader, val_loader, config: CompressConfig, out,
                    workers: int):
    """The runner (a :class:`CompressRunner` by default), after the probe before any run (the
    model, its data, the directory) and, for worker processes, a check that it pickles."""
    runner = runner if runner is not None else CompressRunner(model, train_loader, val_loader, config)
    if isinstance(runner, CompressRunner):
        train, val, calibration = runner._data()
        check_inputs(model, {"train_loader": train, "val_loader": val, "calibration_loader": calibration}, config,
                     out=out)
    if workers > 1:
        _picklable(runner, workers)
    return runner


def _searched(judge: _Judge, methods: str, sequences, insertion: bool, repetition: bool) -> SearchPlan:
    """The pair stage, the order graph and its confidence, the paper's checks and the sequence table."""
    evidence = _pair_stage(judge, methods)
    graph = order_graph(methods, evidence)
    order = graph["orders"][0]
    checks = _insertion_checks(judge, methods, graph["edges"]) if insertion else []
    if repetition:
        checks += _repetition_checks(judge, methods, order)
    seq_points = judge.sequences(*_sequences(sequences, methods, order, graph["orders"]))
    return SearchPlan(
        methods=methods, order=order, unique=graph["unique"], orders_consistent=graph["orders"],
        pairwise=evidence, cycles=graph["cycles"],
        table=sequence_table(seq_points, judge.original_accuracy, judge.limits, judge.resampling, judge.original),
        original_accuracy=judge.original_accuracy, grid=judge.grid, tie_threshold=float(judge.tie_threshold),
        limits=judge.limits, insertion=[c for c in checks if c["kind"] == "insertion"],
        repetition=[c for c in checks if c["kind"] == "repetition"], sequence_points=seq_points,
        confidence=order_confidence(methods, evidence, order, judge.tie_threshold), seeds=len(judge.runs.executors))


def _pair_stage(judge: _Judge, methods: str) -> Dict[str, PairEvidence]:
    """Both orders of every pair over the grid; each pair's evidence."""
    pairs = ["".join(p) for p in itertools.combinations(methods, 2)]
    points = judge.sequences(*[o for p in pairs for o in (p, p[::-1])])
    return {p: judge.compare(p, p[::-1], points) for p in pairs}


def _check_record(kind: str, e: PairEvidence, **fields) -> Dict[str, Any]:
    return {"kind": kind, **fields, "margin": e.margin, "interval": list(e.interval) if e.interval else None,
            "decisive": e.decisive, "evidence": e.to_dict()}


def _insertion_checks(judge: _Judge, methods: str, edges) -> List[Dict[str, Any]]:
    """For every decisive A->B and every other method C: A C B against B C A (the paper's check
    that a third method between them keeps the pair's verdict)."""
    checks = []
    for (a, b) in sorted(edges):
        for c in methods:
            if c in (a, b):
                continue
            kept, flipped = a + c + b, b + c + a
            e = judge.compare(kept, flipped, judge.sequences(kept, flipped))
            checks.append(_check_record("insertion", e, first=a, inserted=c, second=b,
                                        verdict="kept" if e.winner == kept else "reversed" if e.winner else "tie"))
    return checks


def _repetition_checks(judge: _Judge, methods: str, order: str) -> List[Dict[str, Any]]:
    """The paper's repetition check: each method but E run twice (DD, PP, QQ) against once, and
    the found order with its last method but E repeated right after itself (DPQE: DPQQE) against
    the order; each "helps" (the repeat is decisively better), "hurts" or "no gain"."""
    checks = []
    cases = [(x + x, x) for x in methods if x != "E"]
    last = next((i for i in range(len(order) - 1, -1, -1) if order[i] != "E"), None)
    if last is not None and len(order) > 1:
        cases.append((order[:last + 1] + order[last] + order[last + 1:], order))
    for repeated, once in cases:
        e = judge.compare(repeated, once, judge.sequences(repeated, once), against=once)
        verdict = "helps" if e.winner == repeated else "hurts" if e.winner else "no gain"
        checks.append(_check_record("repetition", e, repeated=repeated, once=once, verdict=verdict))
    return checks


def search_order(
    model: nn.Module,
    train_loader,
    val_loader,
    methods: str = METHODS,
    grid: Union[SearchGrid, str, int, None] = "small",
    *,
    config: Union[CompressConfig, Dict, str, Path, None] = None,
    epochs: Optional[int] = None,
    max_batches: Optional[int] = None,
    device: Union[str, torch.device, None] = None,
    out: Union[str, Path, None] = None,
    workers: int = 1,
    executor: str = "local",
    address: Optional[str] = None,
    seeds: int = 1,
    sequences: Union[str, Sequence[str], None] = None,
    insertion: bool = True,
    repetition: bool = True,
    tie_threshold: float = TIE_THRESHOLD,
    limits: Sequence[float] = LIMITS,
    runner: Optional[Callable[[RunSpec], List[Point]]] = None,
    progress: bool = False,
    verbose: bool = True,
    budget: Union[SearchGrid, str, int, None] = None,
) -> SearchPlan:
    """Finds the order of ``methods`` (any 2 to 4 of "DPQE") for ``model`` from pairwise experiments.

    Every pair runs in both orders over the ``grid`` (a :class:`SearchGrid`, a ``PRESETS`` name or
    strengths per method; ``budget=``, its old name, warns), each run a :func:`compress` with
    ``config`` (``epochs`` / ``max_batches`` / ``device`` as there) choosing on its calibration
    split, its points measured on ``val_loader`` with each input's answer; every verdict has a 95 %
    bootstrap interval (decisive only when it excludes a tie), ``seeds`` repeats every run with
    ``train.seed`` + 0, 1, ... (their spread folded in), and the plan's ``confidence`` is the share
    of resamples that sort to its order. ``out``: the search directory (cached runs, prefix
    models, plots, table, JSON; rerun to resume). ``workers``: worker processes (picklable loaders
    or factories, and runner); ``executor="ray"``: each run a task of the Ray cluster at
    ``address`` (None: the one connected to, else a local one for the search). ``sequences``: the
    table's orders (None: the order found, and its reverse for two methods; "all", "consistent",
    "D-first" (the paper's Table 1), or a list). ``insertion`` / ``repetition``: the paper's
    checks (A[C]B against B[C]A per decisive A->B; DD, PP, QQ and the order with its last method
    but E repeated). ``runner(run_spec) -> points`` replaces the compress() runs: points are dicts
    with ``accuracy`` (%), ``bitops_cr`` and, for intervals, ``correct``
    (:func:`ordercomp.stats.pack_correct`); the empty chain gives the original's. ``progress``:
    bars inside runs; ``verbose``: a line per run, the count and a time estimate.
    """
    if budget is not None:
        warnings.warn("search_order(budget=...) is now grid=... (the strengths each method runs at; not the "
                      "accuracy budget)", DeprecationWarning, stacklevel=2)
        grid = budget
    shortcuts = dict(epochs=epochs, max_batches=max_batches, device=device, progress=progress)
    methods, grid, limits, config = _check_arguments(methods, grid, workers, tie_threshold, limits, sequences,
                                                     config, shortcuts, seeds, executor, address)
    log = (lambda line: print(line, flush=True)) if verbose else (lambda line: None)
    model = copy.deepcopy(model).cpu()
    base_key = _run_key(model, config)
    runner = _checked_runner(runner, model, train_loader, val_loader, config, out, workers if executor == "local" else 1)
    started_ray = _start_ray(address) if executor == "ray" else False
    keep_below = max(len(methods), 3 if insertion else 0, len(methods) + 1 if repetition else 0)
    root, tmp = _search_dir(out)
    runs = _Seeds([_Executor(runner, base_key, root, workers, keep_below, log, seed, executor)
                   for seed in range(seeds)])
    try:
        judge = _Judge(runs, grid, limits, tie_threshold)
        plan = _searched(judge, methods, sequences, insertion, repetition)
        plan.runs, plan.out = {**runs.runs, "dir": str(root) if out else None}, Path(out) if out is not None else None
        for c in plan.cycles:
            log(f"search: cycle {c['cycle']} among the verdicts; dropped its weakest edge {c['weakest']} "
                f"(margin {c['margin']:.2f} pp)")
        if out is not None:
            write_search_report(plan, root)
        return plan
    finally:
        runs.close()
        if started_ray:
            import ray

            ray.shutdown()
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
