"""Order search: derive the order of compression methods from pairwise experiments.

For every pair of the chosen methods both orders (AB and BA) are run over a grid of each
method's strength, every run fine-tuned as in :func:`~ordercomp.pipeline.compress`. Each run is
an (accuracy, BitOps) point, or one point per threshold when the model has exits. The Pareto
fronts of AB and BA in the (accuracy, BitOpsCR) plane give a verdict per pair; the decisive
verdicts form a directed graph whose topological sorts are the orders the evidence supports
(the paper's method: Shen et al., "Order of Compression", AAAI 2025).

A run is a chain of steps ``(letter, strength)``; a chain continues from the saved model of
its prefix (every "A then ..." run starts from one A result), finished runs are cached as JSON
keyed by a hash of (model, config, chain) so an interrupted search resumes, and independent
runs go to parallel worker processes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import checkpoint, models
from .pipeline import CompressConfig, compress, evaluate_model, fingerprint, load_result, resolve_device, save_result
from .stages import Context, Distill, EarlyExit, Prune, Quantize, letters, thinner_copy
from .stages.early_exit import DEFAULT_THRESHOLDS

__all__ = [
    "SearchGrid", "SearchPlan", "PairEvidence", "RunSpec", "CompressRunner", "search_order",
    "pareto_front", "best_cr", "front_gap", "compare", "order_graph", "sequence_table",
    "format_table", "add_search_parser", "TorchrunRunner", "LIMITS", "TIE_THRESHOLD", "PRESETS",
]

METHODS = "DPQE"
LIMITS = (0.2, 0.6, 1.0, 2.0)
TIE_THRESHOLD = 0.2  # pp: a mean front gap below this is a tie (the tightest loss limit of Table 1)
Point = Dict[str, float]
Step = Tuple[str, Any]
Chain = Tuple[Step, ...]


# --------------------------------------------------------------------------------------------
# The grid of strengths


def _bits(value) -> Tuple[int, int]:
    if isinstance(value, str):
        w, sep, a = value.lower().rstrip("a").partition("w")
        if sep and w.isdigit() and a.isdigit():
            return int(w), int(a)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"Q grid entries must be (w_bits, a_bits) pairs or strings like '4w8a', got {value!r}")


@dataclass
class SearchGrid:
    """The strengths each method is run at.

    ``D``: student widths in (0, 1) (a re-initialised thinner copy of the original model) or zoo
    names; ``P``: pruning ratios in (0, 1); ``Q``: ``(w_bits, a_bits)`` pairs or ``"4w8a"``
    strings; ``E``: the confidence thresholds swept (one run gives a point per threshold).
    """

    D: Sequence[Union[float, str]] = (0.5,)
    P: Sequence[float] = (0.3, 0.5, 0.7)
    Q: Sequence[Any] = ((8, 8), (4, 8), (2, 8))
    E: Sequence[float] = DEFAULT_THRESHOLDS

    def __post_init__(self) -> None:
        self.D = tuple(self.D)
        self.P = tuple(self.P)
        self.Q = tuple(_bits(b) for b in self.Q)
        self.E = tuple(self.E)
        for letter in METHODS:
            if not getattr(self, letter):
                raise ValueError(f"grid {letter} must hold at least one strength, got an empty list")
        for d in self.D:
            if isinstance(d, bool) or not isinstance(d, (int, float, str)) or (not isinstance(d, str) and not 0 < d < 1):
                raise ValueError(f"grid D: entries must be widths in (0, 1) or zoo model names, got {d!r}")
        checks = [("D", lambda d: Distill(student=d) if isinstance(d, str) else None),
                  ("P", lambda r: Prune(ratio=r)), ("Q", lambda b: Quantize(w_bits=b[0], a_bits=b[1]))]
        for letter, check in checks:
            for value in getattr(self, letter):
                try:
                    check(value)
                except ValueError as exc:
                    raise ValueError(f"grid {letter}: {exc}") from exc
        try:
            EarlyExit(thresholds=self.E)
        except ValueError as exc:
            raise ValueError(f"grid E: {exc}") from exc
        self.P = tuple(float(r) for r in self.P)

    def steps(self, letter: str) -> List[Step]:
        """The steps of ``letter``: one per strength, a single step for E (its thresholds are swept)
        and for a registered method outside D, P, Q, E (its default config)."""
        if letter not in METHODS:
            return [(letter, None)]
        if letter == "E":
            return [("E", tuple(float(t) for t in self.E))]
        if letter == "Q":
            return [("Q", tuple(b)) for b in self.Q]
        return [(letter, v) for v in getattr(self, letter)]

    def to_dict(self) -> Dict[str, list]:
        return {letter: [list(v) if isinstance(v, tuple) else v for v in getattr(self, letter)] for letter in METHODS}

    @classmethod
    def from_budget(cls, budget: Union["SearchGrid", str, int, None]) -> "SearchGrid":
        """A grid from a :class:`SearchGrid`, a preset name (see ``PRESETS``) or a number of strengths
        per method (evenly picked from the "large" preset; E keeps its thresholds)."""
        if budget is None:
            return cls()
        if isinstance(budget, cls):
            return budget
        if isinstance(budget, str):
            if budget not in PRESETS:
                raise ValueError(f"budget must be a SearchGrid, an integer >= 1 or one of {sorted(PRESETS)}, got {budget!r}")
            return copy.deepcopy(PRESETS[budget])
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a SearchGrid, an integer >= 1 or one of {sorted(PRESETS)}, got {budget!r}")
        large = PRESETS["large"]

        def pick(values):
            if budget >= len(values):
                return values
            return tuple(values[round(i * (len(values) - 1) / max(budget - 1, 1))] for i in range(budget))

        return cls(D=pick(large.D), P=pick(large.P), Q=pick(large.Q), E=large.E)


PRESETS: Dict[str, SearchGrid] = {
    "tiny": SearchGrid(D=(0.5,), P=(0.5,), Q=((4, 8),), E=(0.6, 0.9)),
    "small": SearchGrid(),
    "medium": SearchGrid(D=(0.75, 0.5), P=(0.2, 0.4, 0.6, 0.8), Q=((8, 8), (4, 8), (2, 8), (1, 8))),
    "large": SearchGrid(D=(0.75, 0.5, 0.25), P=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                        Q=((8, 8), (4, 8), (4, 4), (2, 8), (1, 8))),
}


def step_label(step: Step) -> str:
    letter, value = step
    if letter == "D":
        return f"D({value})" if isinstance(value, str) else f"D(w={value:g})"
    if letter == "P":
        return f"P({value:g})"
    if letter == "Q":
        return f"Q({value[0]}w{value[1]}a)"
    return letter


def chain_label(chain: Chain) -> str:
    return " ".join(step_label(s) for s in chain) or "original"


def _jsonable_step(step: Step) -> list:
    letter, value = step
    return [letter, list(value) if isinstance(value, tuple) else value]


def _check_methods(methods) -> str:
    known = letters()
    ok = isinstance(methods, str) and 2 <= len(methods) <= len(known) and len(set(methods.upper())) == len(methods) \
        and set(methods.upper()) <= set(known)
    if not ok:
        raise ValueError(f"methods must be 2 to {len(known)} distinct letters of {known} (e.g. 'PQ'), got {methods!r}")
    return methods.upper()


# --------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunSpec:
    """One run: the chain of steps, its cache key, and where the models of it and its prefix are kept."""

    steps: Chain
    key: str
    parent_key: Optional[str] = None
    model_path: Optional[str] = None
    parent_model_path: Optional[str] = None

    @property
    def order(self) -> str:
        return "".join(letter for letter, _ in self.steps)

    @property
    def label(self) -> str:
        return chain_label(self.steps)


def _loader(obj):
    """A loader, or what a zero-argument factory builds (factories travel to worker processes cheaply)."""
    if callable(obj) and not hasattr(obj, "__iter__"):
        return obj()
    return obj


class CompressRunner:
    """Runs a chain's last step with :func:`compress`, continuing from the saved model of its prefix.

    ``train_loader`` / ``val_loader`` may be loaders or picklable zero-argument factories of them
    (built once per process). The empty chain evaluates the original model. Each run restarts the
    loaders' shuffling generators from ``config.train.seed``, so a run's result does not depend on
    the runs before it or on the worker that ran it.
    """

    writes_models = True

    def __init__(self, model: nn.Module, train_loader, val_loader, config: CompressConfig):
        self.model = model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.config = config
        self._built = None

    def __getstate__(self):
        return dict(self.__dict__, _built=None)

    def _data(self):
        if self._built is None:
            self._built = (_loader(self.train_loader), _loader(self.val_loader))
        train, val = self._built
        for loader in (train, val):
            generator = getattr(loader, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(self.config.train.seed)
        return train, val

    def stage_config(self, step: Step, example_input: torch.Tensor) -> CompressConfig:
        """The compress() config of one step: the base config with the step's strength set."""
        letter, value = step
        c = self.config
        if letter == "D":
            if isinstance(value, str):
                stage = dataclasses.replace(c.distill, student=value)
            else:
                torch.manual_seed(c.train.seed)
                student = thinner_copy(self.model.to(example_input.device), float(value), example_input)
                stage = dataclasses.replace(c.distill, student=student.cpu(), width=float(value))
            return dataclasses.replace(c, order="D", distill=stage)
        if letter == "P":
            return dataclasses.replace(c, order="P", prune=dataclasses.replace(c.prune, ratio=float(value)))
        if letter == "Q":
            return dataclasses.replace(c, order="Q", quantize=dataclasses.replace(c.quantize, w_bits=value[0],
                                                                                    a_bits=value[1]))
        if letter == "E":
            return dataclasses.replace(c, order="E", early_exit=dataclasses.replace(c.early_exit,
                                                                                    thresholds=tuple(value)))
        return dataclasses.replace(c, order=letter)

    def __call__(self, spec: RunSpec) -> List[Point]:
        train, val = self._data()
        device = resolve_device(self.config.device)
        if not spec.steps:
            context = Context.create(copy.deepcopy(self.model), train, val, self.config.train, device)
            original = evaluate_model(context.teacher, context)
            return [{"accuracy": original["accuracy"], "bitops": original["bitops"], "bitops_cr": 1.0}]
        parent, lineage = self.model, None
        if spec.parent_model_path:
            parent, lineage = load_result(spec.parent_model_path, model=self.model)
        example = next(iter(val))[0][:2].to(device)
        config = self.stage_config(spec.steps[-1], example)
        result = compress(parent, train, val, config=config, reference=self.model, lineage=lineage)
        if spec.model_path:
            result.model.cpu()
            result.save(spec.model_path)
        return _report_points(result.report)


def _report_points(report: Dict[str, Any]) -> List[Point]:
    """A run's points: one per threshold when its last stage is an early exit, else one."""
    stage = report["stages"][-1]
    if stage.get("exit_sweep"):
        return [{"accuracy": p["accuracy"], "bitops": p["bitops"], "bitops_cr": p["bitops_cr"],
                 "threshold": p["threshold"]} for p in stage["exit_sweep"]]
    return [{"accuracy": stage["accuracy"], "bitops": stage["bitops"], "bitops_cr": stage["bitops_cr"]}]


class TorchrunRunner(CompressRunner):
    """Like :class:`CompressRunner`, but each run is ``torchrun --nproc_per_node=N -m ordercomp compress``.

    The data must be described by ``config.data`` (each run's processes load it themselves). The
    prefix model and a derived student travel as result files (tensors plus a recipe, nothing
    unpickled); the original model (the reference of the ratios) too when it is a zoo model,
    otherwise the runs read it from ``model_file``, the user's own saved model. Each run's
    directory under ``workdir`` keeps its report and model.
    """

    def __init__(self, model: nn.Module, config: CompressConfig, nproc: int, workdir, model_file=None):
        if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
            raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
        if model_file is None and models.identify(model) is None:
            raise ValueError(f"model_file must be given for a model outside the zoo ({type(model).__name__}): "
                             "the file the model was saved to whole, from which each run rebuilds it")
        self.model_file = None if model_file is None else Path(model_file)
        data = dataclasses.asdict(config.data)
        super().__init__(model, _BundleLoader(data, config.train.seed, "train_loader"),
                         _BundleLoader(data, config.train.seed, "val_loader"), config)
        self.nproc = nproc
        self.workdir = Path(workdir)

    def __call__(self, spec: RunSpec) -> List[Point]:
        if not spec.steps:
            return super().__call__(spec)
        import subprocess
        import sys

        run_dir = self.workdir / spec.key
        _, val = self._data()
        example = next(iter(val))[0][:2]
        original = self.model_file
        if original is None:
            original = self.workdir / "original.pt"
            if not original.exists():
                save_result(original, self.model, example.shape[1:])
        config = self.stage_config(spec.steps[-1], example)
        extra = []
        if isinstance(config.distill.student, nn.Module):
            student = config.distill.student
            extra = ["--student-file", str(save_result(run_dir / "student.pt", student, example.shape[1:]))]
            config = dataclasses.replace(config, distill=dataclasses.replace(config.distill, student=None))
        config.save(run_dir / "run_config.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   "-m", "ordercomp", "compress", "--model-file", str(spec.parent_model_path or original),
                   "--reference-file", str(original), "--config", str(run_dir / "run_config.json"),
                   "--out", str(run_dir), "--quiet", *extra]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun run {spec.label} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        if spec.model_path:
            data = (run_dir / "model.pt").read_bytes()
            checkpoint.atomic_write(spec.model_path, lambda f: f.write(data))
        return _report_points(checkpoint.read_json(run_dir / "report.json"))


def _check_points(points, spec: RunSpec) -> List[Point]:
    if not isinstance(points, list) or not points:
        raise ValueError(f"runner must return a non-empty list of points for {spec.label}, got {points!r}")
    out = []
    for p in points:
        if not isinstance(p, dict) or not {"accuracy", "bitops_cr"} <= set(p):
            raise ValueError(f"runner points must be dicts with 'accuracy' and 'bitops_cr' ({spec.label}), got {p!r}")
        out.append({k: float(v) for k, v in p.items()})
    return out


_WORKER_RUNNER = None


def _init_worker(runner, threads: int) -> None:
    global _WORKER_RUNNER
    torch.set_num_threads(threads)
    _WORKER_RUNNER = runner


def _run_in_worker(spec: RunSpec):
    start = time.perf_counter()
    points = _WORKER_RUNNER(spec)
    return points, time.perf_counter() - start


class _Executor:
    """Runs chains after their prefixes, in this process or in a pool of worker processes, caching
    each finished run as JSON."""

    def __init__(self, runner, base_key: str, root: Path, workers: int, keep_below: int, log: Callable[[str], None]):
        self.runner = runner
        self.base_key = base_key
        self.root = root
        self.workers = workers
        self.keep_below = keep_below
        self.log = log
        self.results: Dict[Chain, Dict[str, Any]] = {}
        self.calls = 0
        self.total = self.done = 0
        self.timed = False
        self.pool: Optional[ProcessPoolExecutor] = None

    def key(self, chain: Chain) -> str:
        payload = json.dumps({"base": self.base_key, "chain": [_jsonable_step(s) for s in chain]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def spec(self, chain: Chain) -> RunSpec:
        writes = getattr(self.runner, "writes_models", False)
        key = self.key(chain)
        parent_key = self.key(chain[:-1]) if chain else None
        model_path = str(self.root / "models" / f"{key}.pt") if writes and 0 < len(chain) < self.keep_below else None
        parent_path = str(self.root / "models" / f"{parent_key}.pt") if writes and len(chain) > 1 else None
        return RunSpec(chain, key, parent_key, model_path, parent_path)

    def _cached(self, spec: RunSpec) -> Optional[Dict[str, Any]]:
        path = self.root / "runs" / f"{spec.key}.json"
        if not path.exists():
            return None
        if spec.model_path and not Path(spec.model_path).exists():
            return None
        return checkpoint.read_json(path)

    def _store(self, spec: RunSpec, points: List[Point], seconds: float) -> Dict[str, Any]:
        record = {"key": spec.key, "order": spec.order, "steps": [_jsonable_step(s) for s in spec.steps],
                  "label": spec.label, "points": points, "seconds": seconds}
        checkpoint.write_json(self.root / "runs" / f"{spec.key}.json", record)
        return record

    def run(self, chains: Iterable[Chain]) -> Dict[Chain, Dict[str, Any]]:
        """Runs every chain (and every prefix of it) not already done; returns the records of ``chains``."""
        chains = list(dict.fromkeys(chains))
        needed = {c[:k] for c in chains for k in range(len(c) + 1)}
        todo, cached = [], 0
        for chain in sorted(needed, key=lambda c: (len(c), chain_label(c))):
            if chain in self.results:
                continue
            spec = self.spec(chain)
            record = self._cached(spec)
            if record is not None:
                self.results[chain] = record
                cached += 1
            else:
                todo.append(spec)
        if todo or cached:
            self._announce(len(todo), cached)
        if self.workers == 1:
            self._sequential(todo)
        elif todo:
            self._parallel(todo)
        return {c: self.results[c] for c in chains}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def _announce(self, todo: int, cached: int) -> None:
        self.total, self.done = todo, 0
        known = [r["seconds"] for r in self.results.values() if r.get("steps") and r.get("seconds")]
        line = f"search: {todo + cached} runs ({cached} cached, {todo} to run) on {self.workers} worker(s)"
        if todo and known:
            mean = sum(known) / len(known)
            line += f"; about {_duration(todo * mean / self.workers)} at {mean:.1f} s per run"
        elif todo:
            line += "; time estimate after the first run"
        self.log(line)

    def _finish(self, spec: RunSpec, points, seconds: float) -> None:
        points = _check_points(points, spec)
        self.results[spec.steps] = self._store(spec, points, seconds)
        self.done += 1
        best = max(points, key=lambda p: p["accuracy"])
        several = f" (best of {len(points)} points)" if len(points) > 1 else ""
        self.log(f"[{self.done}/{self.total}] {spec.label}: accuracy {best['accuracy']:.2f} %, "
                 f"BitOpsCR {best['bitops_cr']:.1f}x{several} in {seconds:.1f} s")
        if spec.steps and not self.timed:
            self.timed = True
            left = self.total - self.done
            if left:
                self.log(f"search: first run took {seconds:.1f} s; about {_duration(left * seconds / self.workers)} "
                         f"for the other {left}")

    def _sequential(self, todo: List[RunSpec]) -> None:
        for spec in todo:
            start = time.perf_counter()
            self.calls += 1
            points = self.runner(spec)
            self._finish(spec, points, time.perf_counter() - start)

    def _parallel(self, todo: List[RunSpec]) -> None:
        """Submits every run whose prefix is done; on a failure, lets the running ones finish, then raises."""
        if self.pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.runner, threads))
        waiting = {spec.steps: spec for spec in todo}
        running, error = {}, None
        while waiting or running:
            if error is None:
                for chain in [c for c in waiting if not c or c[:-1] in self.results]:
                    spec = waiting.pop(chain)
                    running[self.pool.submit(_run_in_worker, spec)] = spec
                    self.calls += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                    continue
                points, seconds = future.result()
                self._finish(spec, points, seconds)
        if error is not None:
            raise error


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# --------------------------------------------------------------------------------------------
# Evidence: fronts, best BitOpsCR under loss limits, the gap between fronts, verdicts


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


# --------------------------------------------------------------------------------------------
# The order graph


def _find_cycle(nodes: str, edges: Dict[Tuple[str, str], float]) -> Optional[List[str]]:
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


# --------------------------------------------------------------------------------------------
# The Table-1 comparison of full sequences


def sequence_table(points: Dict[str, Sequence[Point]], original_accuracy: float,
                   limits: Sequence[float] = LIMITS) -> List[Dict[str, Any]]:
    """One row per sequence: the best BitOpsCR under each accuracy-loss limit and a rank.

    Sequences are ranked by the geometric mean of their best BitOpsCR over the limits (a limit
    a sequence cannot meet counts as 1x); equal scores share a rank, as in the paper's Table 1.
    """
    rows = []
    for sequence, pts in points.items():
        best = {_limit_key(limit): best_cr(pts, original_accuracy, limit) for limit in limits}
        score = sum(math.log(v) for v in best.values() if v) / len(limits)
        rows.append({"sequence": sequence, "best_cr": best, "score": math.exp(score), "points": len(pts)})
    rows.sort(key=lambda r: (-round(r["score"], 6), r["sequence"]))
    for i, row in enumerate(rows):
        same = i and round(rows[i - 1]["score"], 6) == round(row["score"], 6)
        row["rank"] = rows[i - 1]["rank"] if same else i + 1
    return rows


def format_table(rows: Sequence[Dict[str, Any]], limits: Sequence[float] = LIMITS) -> str:
    """The sequence table as Markdown: best BitOpsCR under each accuracy-loss limit."""
    header = ["rank", "order"] + [f"loss <= {limit:g} pp" for limit in limits]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["rank"]), r["sequence"]]
        cells += [_cr(r["best_cr"][_limit_key(limit)]) for limit in limits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass
class SearchPlan:
    """What a search found.

    ``order``: the best order consistent with the evidence; ``unique``: whether it is the only
    one; ``orders_consistent``: all of them; ``pairwise``: per pair, a :class:`PairEvidence`;
    ``cycles``: cycles met among the verdicts with the weakest edge dropped from each;
    ``table``: rows of :func:`sequence_table`; ``insertion``: A[C]B checks when asked for.
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
    sequence_points: Dict[str, List[Point]] = field(default_factory=dict)
    runs: Dict[str, Any] = field(default_factory=dict)
    out: Optional[Path] = None

    def to_dict(self) -> Dict[str, Any]:
        """Everything as plain JSON-able values, every point included."""
        return {
            "methods": self.methods, "order": self.order, "unique": self.unique,
            "orders_consistent": self.orders_consistent, "cycles": self.cycles,
            "original_accuracy": self.original_accuracy, "tie_threshold": self.tie_threshold,
            "limits": list(self.limits), "grid": self.grid.to_dict(),
            "pairwise": {k: v.to_dict() for k, v in self.pairwise.items()},
            "table": self.table, "insertion": self.insertion, "sequence_points": self.sequence_points,
            "runs": self.runs,
        }

    def __str__(self) -> str:
        lines = [f"order: {self.order} ({'unique' if self.unique else 'not unique'}; "
                 f"consistent with the evidence: {', '.join(self.orders_consistent)})",
                 f"original accuracy {self.original_accuracy:.2f} %; tie below {self.tie_threshold:g} pp", "",
                 "pairwise verdicts:"]
        for pair, e in self.pairwise.items():
            best = "; ".join(f"<= {k} pp: " + " vs ".join(_cr(v[o]) for o in e.points) for k, v in e.best.items())
            lines.append(f"  {pair} vs {pair[::-1]}: {e.verdict()}  [best BitOpsCR {best}]")
        for c in self.cycles:
            lines.append(f"cycle {c['cycle']}: dropped its weakest edge {c['weakest']} (margin {c['margin']:.2f} pp)")
        for ins in self.insertion:
            lines.append(f"insertion {ins['first']}[{ins['inserted']}]{ins['second']}: {ins['verdict']} "
                         f"(margin {ins['margin']:+.2f} pp)")
        if self.table:
            lines += ["", "best BitOpsCR under accuracy-loss limits:", format_table(self.table, self.limits)]
        if self.out is not None:
            lines += ["", f"report: {self.out}"]
        return "\n".join(lines)


def _cr(value: Optional[float]) -> str:
    return f"{value:.1f}x" if value else "-"


def _sequence_chains(sequence: str, grid: SearchGrid) -> List[Chain]:
    return [tuple(c) for c in itertools.product(*(grid.steps(letter) for letter in sequence))]


def _points(results: Dict[Chain, Dict[str, Any]], chains: Iterable[Chain]) -> List[Point]:
    return [dict(p, run=results[c]["key"]) for c in chains for p in results[c]["points"]]


def _sequences(spec, methods: str, order: str, consistent: List[str]) -> List[str]:
    if spec is None:
        return list(dict.fromkeys([order] + ([order[::-1]] if len(methods) == 2 else [])))
    if isinstance(spec, str):
        if spec == "all":
            return ["".join(p) for p in itertools.permutations(methods)]
        if spec == "consistent":
            return list(consistent)
        if spec.endswith("-first") and len(spec) == 7 and spec[0].upper() in methods:
            head = spec[0].upper()
            return [head + "".join(p) for p in itertools.permutations(methods.replace(head, ""))]
        spec = [spec]
    out = []
    for s in spec:
        s = s.upper() if isinstance(s, str) else s
        if not isinstance(s, str) or sorted(s) != sorted(methods):
            raise ValueError(f"sequences must be 'all', 'consistent', 'X-first' (X one of {methods}) or orders "
                             f"that use each of {methods} once, got {s!r}")
        out.append(s)
    return list(dict.fromkeys(out))


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
    for every decisive A->B. ``runner(spec) -> points`` replaces the compress() runs (tests plant
    results with it); each point is a dict with ``accuracy`` (%) and ``bitops_cr``, and the empty
    chain must give the original model's point. ``progress``: progress bars inside each run;
    ``verbose``: a line per finished run, the run count and a time estimate.
    """
    methods = _check_methods(methods)
    grid = SearchGrid.from_budget(budget)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if isinstance(tie_threshold, bool) or not isinstance(tie_threshold, (int, float)) or tie_threshold < 0:
        raise ValueError(f"tie_threshold must be a number >= 0 (pp), got {tie_threshold!r}")
    limits = tuple(float(v) for v in limits)
    if not limits or any(v < 0 for v in limits):
        raise ValueError(f"limits must be a non-empty list of accuracy losses >= 0 (pp), got {limits!r}")
    if isinstance(config, (str, Path)):
        config = CompressConfig.load(config)
    elif isinstance(config, dict):
        config = CompressConfig.from_dict(config)
    config = (config or CompressConfig()).with_shortcuts(
        epochs=epochs, max_batches=max_batches, device=str(device) if device is not None else None,
        progress=progress)
    _sequences(sequences, methods, methods, [methods])
    log = (lambda line: print(line, flush=True)) if verbose else (lambda line: None)

    model = copy.deepcopy(model).cpu()
    settings = config.to_dict()
    settings.pop("device")
    settings.pop("order")
    settings["train"].pop("progress")
    base = json.dumps({"model": fingerprint(model), "config": settings}, sort_keys=True, default=str)
    base_key = hashlib.sha256(base.encode()).hexdigest()
    runner = runner if runner is not None else CompressRunner(model, train_loader, val_loader, config)
    if workers > 1:
        import pickle

        try:
            pickle.dumps(runner)
        except Exception as exc:
            raise ValueError(f"workers={workers} needs picklable loaders (or loader factories) and runner: {exc}") from exc
    keep_below = max(len(methods), 3 if insertion else 0)
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="ordercomp-search-")
        root = Path(tmp.name)
    else:
        root = Path(out)
        root.mkdir(parents=True, exist_ok=True)
    executor = _Executor(runner, base_key, root, workers, keep_below, log)
    try:
        pairs = ["".join(p) for p in itertools.combinations(methods, 2)]
        pair_chains = {o: [(x, y) for x in grid.steps(o[0]) for y in grid.steps(o[1])]
                       for p in pairs for o in (p, p[::-1])}
        executor.run([()] + [c for cs in pair_chains.values() for c in cs])
        original_accuracy = executor.results[()]["points"][0]["accuracy"]
        evidence = {p: compare(p, _points(executor.results, pair_chains[p]),
                               _points(executor.results, pair_chains[p[::-1]]), original_accuracy, limits,
                               tie_threshold) for p in pairs}
        graph = order_graph(methods, evidence)
        order = graph["orders"][0]

        checks = []
        if insertion:
            for (a, b) in sorted(graph["edges"]):
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

        seqs = _sequences(sequences, methods, order, graph["orders"])
        seq_chains = {s: _sequence_chains(s, grid) for s in seqs}
        executor.run([c for cs in seq_chains.values() for c in cs])
        seq_points = {s: _points(executor.results, cs) for s, cs in seq_chains.items()}
        table = sequence_table(seq_points, original_accuracy, limits)
        plan = SearchPlan(
            methods=methods, order=order, unique=graph["unique"], orders_consistent=graph["orders"],
            pairwise=evidence, cycles=graph["cycles"], table=table, original_accuracy=original_accuracy,
            grid=grid, tie_threshold=float(tie_threshold), limits=limits, insertion=checks,
            sequence_points=seq_points,
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


# --------------------------------------------------------------------------------------------
# Reports


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        checkpoint.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_pair(evidence: PairEvidence, original_accuracy: float, path) -> Path:
    """AB against BA in the (BitOpsCR, accuracy) plane with both Pareto fronts (the paper's Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for (order, pts), color, marker in zip(evidence.points.items(), ("tab:blue", "tab:orange"), ("o", "^")):
        ax.scatter([p["bitops_cr"] for p in pts], [p["accuracy"] for p in pts], c=color, marker=marker, alpha=0.6,
                   label=f"{order} ({len(pts)} point{'s' if len(pts) != 1 else ''})")
        front = pareto_front(pts)
        ax.step([p["bitops_cr"] for p in front], [p["accuracy"] for p in front], where="pre", color=color, lw=1.5)
    ax.axhline(original_accuracy, color="gray", ls="--", lw=1, label="original")
    ax.set_xscale("log")
    ax.set_xlabel("BitOps compression ratio (log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{evidence.pair} vs {evidence.pair[::-1]}: {evidence.verdict()}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_graph(plan: SearchPlan, path) -> Path:
    """The methods on a circle; an arrow per decisive verdict labelled with its margin (the label
    sits nearer the arrow's tail), dropped cycle edges dashed red, ties dotted grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    n = len(plan.methods)
    pos = {m: (math.sin(2 * math.pi * i / n), math.cos(2 * math.pi * i / n)) for i, m in enumerate(plan.methods)}
    dropped = {tuple(c["weakest"].split("->")) for c in plan.cycles}
    for e in plan.pairwise.values():
        a, b = e.edge or tuple(e.pair)
        (x0, y0), (x1, y1) = pos[a], pos[b]
        if e.edge:
            style = dict(color="tab:red", ls="--") if e.edge in dropped else dict(color="black", ls="-")
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="-|>", shrinkA=18, shrinkB=18, lw=1.5, **style))
            label = f"{abs(e.margin):.2f}"
        else:
            ax.plot([x0, x1], [y0, y1], color="gray", ls=":", lw=1)
            label = "tie"
        ax.text(x0 + 0.38 * (x1 - x0), y0 + 0.38 * (y1 - y0), label, fontsize=8, ha="center", va="center",
                bbox=dict(boxstyle="round", fc="white", ec="none", alpha=0.8))
    for m, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), 0.16, color="tab:blue", zorder=3))
        ax.text(x, y, m, color="white", fontsize=14, ha="center", va="center", zorder=4, weight="bold")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"order {plan.order} ({'unique' if plan.unique else 'not unique'}); margins in pp", fontsize=9)
    return _save(fig, Path(path))


def write_search_report(plan: SearchPlan, out) -> Dict[str, Path]:
    """search.json (every point), table.md, summary.txt, pairs/<AB>.png and order_graph.png in ``out``."""
    out = Path(out)
    paths = {"json": checkpoint.write_json(out / "search.json", plan.to_dict()),
             "table": checkpoint.write_text(out / "table.md", "# Best BitOpsCR under accuracy-loss limits\n\n"
                                            + format_table(plan.table, plan.limits) + "\n"),
             "summary": checkpoint.write_text(out / "summary.txt", str(plan) + "\n"),
             "graph": plot_graph(plan, out / "order_graph.png")}
    for pair, e in plan.pairwise.items():
        paths[f"pair_{pair}"] = plot_pair(e, plan.original_accuracy, out / "pairs" / f"{pair}.png")
    return paths


# --------------------------------------------------------------------------------------------
# Command line


class _BundleLoader:
    """A picklable factory of one loader of a dataset bundle (the bundle is built once per process)."""

    _bundles: Dict[str, Any] = {}

    def __init__(self, data: Dict[str, Any], seed: int, which: str):
        self.data, self.seed, self.which = data, seed, which

    def bundle(self):
        from . import data

        key = json.dumps([self.data, self.seed], sort_keys=True)
        if key not in self._bundles:
            d = self.data
            self._bundles[key] = data.load(d["name"], d["root"], batch_size=d["batch_size"], split_val=d["split_val"],
                                           limit=d["limit"], num_workers=d["num_workers"], augment=d["augment"],
                                           seed=self.seed)
        return self._bundles[key]

    def __call__(self):
        return getattr(self.bundle(), self.which)


def cmd_search(args) -> int:
    """``ordercomp search-order``: trains a fresh zoo teacher when needed, searches, prints the plan."""
    from . import distributed
    from .cli import _config, read_model, read_weights, trained_teacher

    config = _config(args)
    data = dataclasses.asdict(config.data)
    train = _BundleLoader(data, config.train.seed, "train_loader")
    val = _BundleLoader(data, config.train.seed, "val_loader")
    out = Path(args.out)
    if args.model_file:
        model = read_model(args.model_file)[0]
    elif args.weights:
        bundle = train.bundle()
        model = read_weights(args.weights, models.create(args.model, num_classes=bundle.num_classes,
                                                         in_channels=bundle.in_channels))
    else:
        model = trained_teacher(args.model, config, train.bundle(), out, distributed.Dist(), reuse=True)
    budget = int(args.budget) if args.budget.isdigit() else args.budget
    sequences = args.sequences.split(",") if args.sequences and "," in args.sequences else args.sequences
    runner = None
    if args.nproc_per_run > 1:
        runner = TorchrunRunner(model, config, args.nproc_per_run, out / "torchrun", model_file=args.model_file)
    plan = search_order(model, train, val, args.methods, budget, config=config, out=out, workers=args.workers,
                        sequences=sequences, insertion=args.insertion, tie_threshold=args.tie, verbose=not args.quiet,
                        runner=runner)
    print(plan)
    return 0


def add_search_parser(subparsers):
    """Adds the ``search-order`` subcommand to ``subparsers`` (the command line's sub-parsers)."""
    from . import models
    from .cli import _add_config_flags

    p = subparsers.add_parser("search-order", help="find the order of D, P, Q, E from pairwise experiments")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=models.names(), metavar="NAME", help=f"zoo model: {', '.join(models.names())}")
    source.add_argument("--model-file", type=Path, help="the model: saved whole with torch.save(model, path) "
                                                        "(trusted code, it is unpickled) or a result file")
    p.add_argument("--weights", type=Path, help="state dict for --model, read weights-only (otherwise the teacher "
                                                "is trained first)")
    p.add_argument("--methods", default=METHODS, help="the methods to order: 2 to 4 of D, P, Q, E and any "
                                                      "registered letter (default DPQE)")
    p.add_argument("--budget", default="small", help=f"grid: {', '.join(PRESETS)} or strengths per method")
    p.add_argument("--sequences", help="orders of the table: all, consistent, D-first, or a comma list (default: the order found)")
    p.add_argument("--insertion", action="store_true", help="also check that A[C]B keeps A before B")
    p.add_argument("--tie", type=float, default=TIE_THRESHOLD, help="mean front gap (pp) below which a pair is a tie")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--nproc-per-run", type=int, default=1,
                   help="processes per run: each run is torchrun --nproc_per_node=N (DistributedDataParallel)")
    p.add_argument("--epochs", type=int, help="epochs of every training phase (overrides the config)")
    p.add_argument("--max-batches", type=int, help="batches per epoch of every training phase")
    p.add_argument("--teacher-epochs", type=int, help="epochs to train a fresh --model before the search")
    p.add_argument("--out", required=True, help="search directory: cached runs, plots, table, JSON (rerun to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no line per run")
    _add_config_flags(p)
    p.set_defaults(func=cmd_search)
    return p
