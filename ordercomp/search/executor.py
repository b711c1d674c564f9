"""Running chains: the cache of finished runs and the pool of worker processes, or a Ray cluster.

Finished runs are cached as JSON keyed by a hash of (model, config, chain), so an interrupted
search resumes; a chain runs after its prefix (whose saved model it continues from), and
independent runs go to parallel worker processes ("spawn") or, with ``backend="ray"``, to the
tasks of a Ray cluster: the runner (the model and its data) is shipped once through the object
store, each prefix model travels as bytes to the task that continues it and back, so the
cluster's machines need no shared disk, and a task whose worker is lost is run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch

from .. import checkpoint
from ..errors import BadFileError, ConfigError
from .evidence import Point
from .grid import Chain, _jsonable_step, chain_label
from .runners import RunSpec

def _check_points(points, run_spec: RunSpec) -> List[Point]:
    """A runner's points as dicts of floats (``correct``: text, ``seed``: an integer), after checking
    they hold accuracy and BitOpsCR."""
    if not isinstance(points, list) or not points:
        raise ConfigError(f"runner must return a non-empty list of points for {run_spec.label}, got {points!r}")
    out = []
    for p in points:
        if not isinstance(p, dict) or not {"accuracy", "bitops_cr"} <= set(p):
            raise ConfigError(f"runner points must be dicts with 'accuracy' and 'bitops_cr' ({run_spec.label}), got {p!r}")
        if "correct" in p and not isinstance(p["correct"], str):
            raise ConfigError(f"a runner point's 'correct' must be ordercomp.stats.pack_correct's text "
                              f"({run_spec.label}), got {type(p['correct']).__name__}")
        out.append({k: v if k == "correct" else int(v) if k == "seed" else float(v) for k, v in p.items()})
    return out


_WORKER_RUNNER = None


def _init_worker(runner, threads: int) -> None:
    """Worker process start: keeps the runner and shares the cores among the workers."""
    global _WORKER_RUNNER
    torch.set_num_threads(threads)
    _WORKER_RUNNER = runner


def _run_in_worker(run_spec: RunSpec):
    start = time.perf_counter()
    points = _WORKER_RUNNER(run_spec)
    return points, time.perf_counter() - start


def _ray_run(runner, run_spec: RunSpec, parent: Optional[bytes]):
    """One run as a Ray task, on any machine: the prefix model arrives as bytes and the run's own
    model (when it is kept) goes back as bytes; ``(points, seconds, model bytes or None)``."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ordercomp-run-") as tmp:
        local = run_spec
        if parent is not None:
            Path(tmp, "parent.pt").write_bytes(parent)
            local = dataclasses.replace(local, parent_model_path=str(Path(tmp, "parent.pt")))
        if run_spec.model_path:
            local = dataclasses.replace(local, model_path=str(Path(tmp, "model.pt")))
        start = time.perf_counter()
        points = runner(local)
        kept = Path(tmp, "model.pt")
        return points, time.perf_counter() - start, kept.read_bytes() if local.model_path and kept.exists() else None


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class _Executor:
    """Runs chains after their prefixes, in this process or in a pool of worker processes, caching
    each finished run as JSON."""

    def __init__(self, runner, base_key: str, root: Path, workers: int, keep_below: int, log: Callable[[str], None],
                 seed: int = 0, backend: str = "local"):
        self.runner = runner
        self.backend = backend
        self.seed = seed
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
        seed = {"seed": self.seed} if self.seed else {}  # seed 0: the keys of a search without seeds
        payload = json.dumps({"base": self.base_key, "chain": [_jsonable_step(s) for s in chain], **seed},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def run_spec(self, chain: Chain) -> RunSpec:
        writes = getattr(self.runner, "writes_models", False)
        key = self.key(chain)
        parent_key = self.key(chain[:-1]) if chain else None
        model_path = str(self.root / "models" / f"{key}.pt") if writes and 0 < len(chain) < self.keep_below else None
        parent_path = str(self.root / "models" / f"{parent_key}.pt") if writes and len(chain) > 1 else None
        return RunSpec(chain, key, parent_key, model_path, parent_path, self.seed)

    def _cached(self, run_spec: RunSpec) -> Optional[Dict[str, Any]]:
        path = self.root / "runs" / f"{run_spec.key}.json"
        if not path.exists():
            return None
        if run_spec.model_path and not Path(run_spec.model_path).exists():
            return None
        fix = ("the search's cache was changed after ordercomp wrote it: delete that file (the run is redone) or "
               "search into a new --out")
        record = checkpoint.read_record(path, {"key": str, "points": list, "seconds": float}, fix)
        if record["key"] != run_spec.key:
            raise BadFileError(f"{path}: holds run {record['key']!r}, not {run_spec.key!r}; {fix}")
        for i, point in enumerate(record["points"]):
            checkpoint.check_fields(point, {"accuracy": float, "bitops_cr": float}, f"{path}: point {i + 1}", fix,
                                    {"bitops": float, "threshold": (float, type(None)), "correct": str, "seed": int})
        if not record["points"]:
            raise BadFileError(f"{path}: holds no points; {fix}")
        return record

    def _store(self, run_spec: RunSpec, points: List[Point], seconds: float) -> Dict[str, Any]:
        record = {"key": run_spec.key, "order": run_spec.order, "steps": [_jsonable_step(s) for s in run_spec.steps],
                  "label": run_spec.label, "points": points, "seconds": seconds}
        checkpoint.write_json(self.root / "runs" / f"{run_spec.key}.json", record)
        return record

    def run(self, chains: Iterable[Chain]) -> Dict[Chain, Dict[str, Any]]:
        """Runs every chain (and every prefix of it) not already done; returns the records of ``chains``."""
        chains = list(dict.fromkeys(chains))
        needed = {c[:k] for c in chains for k in range(len(c) + 1)}
        todo, cached = [], 0
        for chain in sorted(needed, key=lambda c: (len(c), chain_label(c))):
            if chain in self.results:
                continue
            run_spec = self.run_spec(chain)
            record = self._cached(run_spec)
            if record is not None:
                self.results[chain] = record
                cached += 1
            else:
                todo.append(run_spec)
        if todo or cached:
            self._announce(len(todo), cached)
        if self.backend == "ray" and todo:
            self._ray(todo)
        elif self.workers == 1:
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

    def _finish(self, run_spec: RunSpec, points, seconds: float) -> None:
        points = _check_points(points, run_spec)
        self.results[run_spec.steps] = self._store(run_spec, points, seconds)
        self.done += 1
        best = max(points, key=lambda p: p["accuracy"])
        several = f" (best of {len(points)} points)" if len(points) > 1 else ""
        self.log(f"[{self.done}/{self.total}] {run_spec.label}: accuracy {best['accuracy']:.2f} %, "
                 f"BitOpsCR {best['bitops_cr']:.1f}x{several} in {seconds:.1f} s")
        if run_spec.steps and not self.timed:
            self.timed = True
            left = self.total - self.done
            if left:
                self.log(f"search: first run took {seconds:.1f} s; about {_duration(left * seconds / self.workers)} "
                         f"for the other {left}")

    def _sequential(self, todo: List[RunSpec]) -> None:
        for run_spec in todo:
            start = time.perf_counter()
            self.calls += 1
            points = self.runner(run_spec)
            self._finish(run_spec, points, time.perf_counter() - start)

    def _ray(self, todo: List[RunSpec]) -> None:
        """Every run as a Ray task once its prefix is done; a task whose worker dies is retried (up
        to 3 times). The task's model comes back as bytes and is kept where the run spec says."""
        import ray

        runner = ray.put(self.runner)  # the model and its data, once for every task
        task = ray.remote(num_cpus=1, max_retries=3)(_ray_run)
        specs = {}

        def submit(run_spec: RunSpec):
            parent = Path(run_spec.parent_model_path).read_bytes() if run_spec.parent_model_path else None
            ref = task.remote(runner, run_spec, parent)
            specs[ref] = run_spec
            return ref

        def finished(refs):
            (ref,), _ = ray.wait(refs, num_returns=1)
            try:
                points, seconds, model = ray.get(ref)
            except Exception as exc:  # the run's own error (Ray wraps it)
                return [(ref, getattr(exc, "cause", None) or exc)]
            if model is not None:
                checkpoint.atomic_write(specs[ref].model_path, lambda f: f.write(model))
            return [(ref, (points, seconds))]

        self._scheduled(todo, submit, finished)

    def _parallel(self, todo: List[RunSpec]) -> None:
        """Every run in the pool of worker processes once its prefix is done."""
        if self.pool is None:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(self.runner, threads))

        def finished(futures):
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            return [(f, f.exception() or f.result()) for f in done]

        self._scheduled(todo, lambda run_spec: self.pool.submit(_run_in_worker, run_spec), finished)

    def _scheduled(self, todo: List[RunSpec], submit, finished) -> None:
        """Submits every run whose prefix is done (``submit(run_spec) -> handle``) and finishes the
        runs ``finished(handles)`` says are done, as ``(handle, (points, seconds) or its error)``;
        on a failure, lets the running ones finish, then raises."""
        waiting = {run_spec.steps: run_spec for run_spec in todo}
        running, error = {}, None
        while waiting or running:
            if error is None:
                for chain in [c for c in waiting if not c or c[:-1] in self.results]:
                    run_spec = waiting.pop(chain)
                    running[submit(run_spec)] = run_spec
                    self.calls += 1
            if not running:
                break
            for handle, outcome in finished(list(running)):
                run_spec = running.pop(handle)
                if isinstance(outcome, BaseException):
                    error = error or outcome
                    continue
                self._finish(run_spec, *outcome)
        if error is not None:
            raise error
