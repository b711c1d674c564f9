"""Order search: fronts and verdicts with their intervals, the order graph with cycles and its
confidence, the paper's checks, seeds, caching, resume, workers, and one real search."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.errors import BadFileError, ConfigError
from ordercomp.search import (
    PRESETS, SearchGrid, SearchPlan, best_cr, compare, front_gap, order_graph, pareto_front, search_order,
    format_sequence_table, sequence_table,
)

ORIGINAL = 90.0
TINY = SearchGrid(D=(0.5,), P=(0.3, 0.6), Q=((8, 8), (4, 8)), E=(0.5, 0.9))
PAIRS_ONLY = dict(insertion=False, repetition=False)  # the pairs' runs alone: the counts below


def _model():
    torch.manual_seed(0)
    return ordercomp.models.create("resnet8", num_classes=10, in_channels=1)


def _cost(step, threshold=None):
    """BitOpsCR factor and accuracy loss (pp) of one step in the planted world."""
    letter, value = step
    if letter == "D":
        return 1 / value ** 2, 1.0
    if letter == "P":
        return 1 / (1 - value) ** 2, 2 * value
    if letter == "Q":
        return 1024 / (value[0] * value[1]), 0.5 * 8 / value[0]
    return 1 + 2 * (1 - threshold), 3 * (1 - threshold)


class Planted:
    """A runner whose results are made up: ``penalty[(a, b)]`` pp are lost when b runs before a.

    ``fail_at``: raise on that call (a crash in the middle of a search). Picklable, so worker
    processes can run it.
    """

    def __init__(self, penalty, fail_at=None):
        self.penalty = dict(penalty)
        self.fail_at = fail_at
        self.calls = []

    def __call__(self, spec):
        self.calls.append(spec.order)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("planted crash")
        if not spec.steps:
            return [{"accuracy": ORIGINAL, "bitops_cr": 1.0}]
        letters = spec.order
        extra = sum(p for (a, b), p in self.penalty.items()
                    if a in letters and b in letters and letters.index(b) < letters.index(a))
        thresholds = [None]
        if "E" in letters:
            thresholds = list(dict(spec.steps)["E"])
        points = []
        for t in thresholds:
            cr, loss = 1.0, extra
            for step in spec.steps:
                f, l = _cost(step, t)
                cr, loss = cr * f, loss + l
            points.append({"accuracy": ORIGINAL - loss, "bitops_cr": cr, **({"threshold": t} if t else {})})
        return points


def _run(penalty, methods="DPQ", tmp_path=None, runner=None, **kw):
    return search_order(_model(), None, None, methods, TINY, runner=runner or Planted(penalty), out=tmp_path,
                        verbose=False, **kw)


# ---------------------------------------------------------------------------------------------
# evidence from points


def test_pareto_front_and_best_cr():
    pts = [{"accuracy": 90, "bitops_cr": 2}, {"accuracy": 89, "bitops_cr": 10}, {"accuracy": 88, "bitops_cr": 5},
           {"accuracy": 85, "bitops_cr": 50}, {"accuracy": 91, "bitops_cr": 1}]
    assert [(p["accuracy"], p["bitops_cr"]) for p in pareto_front(pts)] == [(91, 1), (90, 2), (89, 10), (85, 50)]
    assert best_cr(pts, 90.5, 0.2) == 1
    assert best_cr(pts, 90.5, 1.0) == 2
    assert best_cr(pts, 90.5, 2.0) == 10
    assert best_cr(pts, 95.0, 1.0) is None


def test_front_gap_is_the_mean_accuracy_gap_on_a_log_axis():
    a = [{"accuracy": 90, "bitops_cr": 1}, {"accuracy": 88, "bitops_cr": 100}]
    b = [{"accuracy": 89, "bitops_cr": 1}, {"accuracy": 87, "bitops_cr": 100}]
    area, gap = front_gap(a, b)
    assert area == pytest.approx(2.0) and gap == pytest.approx(1.0)
    # b reaching only 10x: from 10x to 100x it counts at the lowest accuracy (87)
    b = [{"accuracy": 90, "bitops_cr": 1}, {"accuracy": 87, "bitops_cr": 10}]
    area, gap = front_gap(a, b)
    assert area == pytest.approx((88 - 87) * 1 + (88 - 87) * 1) and gap == pytest.approx(1.0)
    assert front_gap(b, a)[1] == pytest.approx(-1.0)
    # fronts read from 1x: a far better model at a lower ratio is not a tie
    a = [{"accuracy": 90, "bitops_cr": 10}]
    b = [{"accuracy": 30, "bitops_cr": 100}]
    area, gap = front_gap(a, b)
    assert area == pytest.approx(60.0) and gap == pytest.approx(30.0)


def test_compare_decisive_and_tie():
    ab = [{"accuracy": 89.9, "bitops_cr": 4}, {"accuracy": 89.0, "bitops_cr": 40}]
    ba = [{"accuracy": 89.0, "bitops_cr": 4}, {"accuracy": 87.0, "bitops_cr": 40}]
    e = compare("PQ", ab, ba, 90.0)
    assert e.decisive and e.winner == "PQ" and e.edge == ("P", "Q") and e.margin > 0
    assert e.best["0.2"] == {"PQ": 4, "QP": None}
    assert e.best["1.0"] == {"PQ": 40, "QP": 4}
    flipped = compare("QP", ba, ab, 90.0)
    assert flipped.winner == "PQ" and flipped.edge == ("P", "Q") and flipped.margin < 0
    close = [{"accuracy": p["accuracy"] - 0.05, "bitops_cr": p["bitops_cr"]} for p in ab]
    tie = compare("PQ", ab, close, 90.0)
    assert not tie.decisive and tie.winner is None and tie.edge is None and 0 < tie.margin < 0.2
    assert compare("PQ", ab, close, 90.0, tie_threshold=0.01).winner == "PQ"


def test_order_graph_unique_ambiguous_and_cycles():
    def ev(pair, margin):
        hi = [{"accuracy": 90, "bitops_cr": 10}]
        lo = [{"accuracy": 90 - abs(margin), "bitops_cr": 10}]
        return compare(pair, hi if margin > 0 else lo, lo if margin > 0 else hi, 90.0)

    chain = {"DP": ev("DP", 2), "DQ": ev("DQ", 3), "PQ": ev("PQ", 1)}
    g = order_graph("DPQ", chain)
    assert g["orders"] == ["DPQ"] and g["unique"] and not g["cycles"]
    partial = {"DP": ev("DP", 2), "DQ": ev("DQ", 3), "PQ": ev("PQ", 0.05)}
    g = order_graph("DPQ", partial)
    assert g["orders"] == ["DPQ", "DQP"] and not g["unique"], "the tie's sign breaks the tie between orders"
    cycle = {"DP": ev("DP", 3), "PQ": ev("PQ", 2), "DQ": ev("DQ", -0.5)}
    g = order_graph("DPQ", cycle)
    assert g["cycles"] == [{"cycle": "D->P->Q->D", "weakest": "Q->D", "margin": 0.5}]
    assert g["orders"] == ["DPQ"] and ("Q", "D") not in g["edges"]


def test_sequence_table_ranks_by_best_cr_under_limits():
    pts = {"DPQE": [{"accuracy": 89.9, "bitops_cr": 100}, {"accuracy": 88.5, "bitops_cr": 800}],
           "DQPE": [{"accuracy": 89.5, "bitops_cr": 100}, {"accuracy": 88.5, "bitops_cr": 800}],
           "DEQP": [{"accuracy": 80.0, "bitops_cr": 1000}]}
    rows = sequence_table(pts, 90.0)
    assert [r["sequence"] for r in rows] == ["DPQE", "DQPE", "DEQP"] and [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["best_cr"] == {"0.2": 100, "0.6": 100, "1.0": 100, "2.0": 800}
    assert rows[2]["best_cr"]["2.0"] is None
    tied = sequence_table({"AB": pts["DPQE"], "BA": pts["DPQE"]}, 90.0)
    assert [r["rank"] for r in tied] == [1, 1]


def test_the_table_shows_intervals_and_a_dash_where_no_point_meets_a_limit():
    row = {"rank": 1, "sequence": "DPQE", "best_cr": {"0.2": None, "0.6": None, "1.0": 40.0, "2.0": 80.0},
           "interval": {"0.2": [1.0, 1.0], "0.6": [1.0, 30.0], "1.0": [35.0, 52.5], "2.0": [80.0, 80.0]}}
    line = format_sequence_table([row], (0.2, 0.6, 1.0, 2.0)).splitlines()[-1]
    assert line == "| 1 | DPQE | - | - [-, 30.0] | 40.0x [35.0, 52.5] | 80.0x [80.0, 80.0] |"


def test_grid_presets_numbers_and_bad_values():
    assert SearchGrid.of("tiny") == PRESETS["tiny"]
    with pytest.warns(DeprecationWarning, match="SearchGrid.from_budget is now SearchGrid.of"):
        assert SearchGrid.from_budget("tiny") == PRESETS["tiny"]
    g = SearchGrid.of(2)
    assert g.P == (0.1, 0.8) and len(g.Q) == 2 and len(g.D) == 2
    assert SearchGrid(Q=["4w8a", (2, 8)]).Q == ((4, 8), (2, 8))
    assert SearchGrid().steps("E") == [("E", tuple(SearchGrid().E))]
    for bad, match in ((dict(P=(1.5,)), "grid P: ratio"), (dict(Q=("4bit",)), "Q grid"), (dict(D=(2,)), "grid D"),
                       (dict(P=()), "grid P")):
        with pytest.raises(ConfigError, match=match):
            SearchGrid(**bad)
    for grid in ("huge", 0, True):
        with pytest.raises(ConfigError, match="grid must be"):
            SearchGrid.of(grid)
    with pytest.raises(ConfigError, match="methods must be"):
        search_order(_model(), None, None, "PX", runner=Planted({}))
    with pytest.raises(ConfigError, match="workers must be an integer >= 1, got 0"):
        search_order(_model(), None, None, "PQ", workers=0, runner=Planted({}))
    with pytest.raises(ConfigError, match="tie_threshold must be a number >= 0, got -1"):
        search_order(_model(), None, None, "PQ", tie_threshold=-1, runner=Planted({}))
    with pytest.raises(ConfigError, match="limits must be"):
        search_order(_model(), None, None, "PQ", limits=(), runner=Planted({}))
    with pytest.raises(ConfigError, match="sequences must be"):
        search_order(_model(), None, None, "PQ", sequences=["PQE"], runner=Planted({}))
    with pytest.raises(ConfigError, match="runner must return a non-empty list of points for original"):
        search_order(_model(), None, None, "PQ", runner=lambda spec: [], verbose=False)


def test_torchrun_runner_checks_its_arguments(tmp_path):
    from ordercomp.search import TorchrunRunner

    with pytest.raises(ConfigError, match="nproc must be an integer >= 1, got 0"):
        TorchrunRunner(_model(), ordercomp.CompressConfig(), 0, tmp_path)
    with pytest.raises(ConfigError, match="model_file must be given for a model outside the zoo"):
        TorchrunRunner(torch.nn.Linear(2, 2), ordercomp.CompressConfig(), 2, tmp_path)


# ---------------------------------------------------------------------------------------------
# the search with planted results


def test_planted_dominance_gives_the_order(tmp_path):
    plan = _run({("D", "P"): 2.0, ("D", "Q"): 2.0, ("P", "Q"): 1.0}, "QPD", tmp_path)
    assert isinstance(plan, SearchPlan)
    assert plan.order == "DPQ" and plan.unique and plan.orders_consistent == ["DPQ"] and not plan.cycles
    assert set(plan.pairwise) == {"QP", "QD", "PD"}
    e = plan.pairwise["PD"]
    assert e.winner == "DP" and e.margin == pytest.approx(-2.0) and e.decisive
    assert len(e.points["PD"]) == len(e.points["DP"]) == 2
    assert plan.pairwise["QP"].winner == "PQ"
    assert [r["sequence"] for r in plan.table] == ["DPQ"]
    assert plan.runs["executed"] == plan.runs["total"]
    for name in ("search.json", "table.md", "summary.txt", "order_graph.png", "pairs/QP.png", "pairs/PD.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["order"] == "DPQ" and len(saved["pairwise"]["PD"]["points"]["DP"]) == 2
    text = str(plan)
    assert "order: DPQ (unique" in text and "D before P" in text and "| 1 | DPQ |" in text


def test_early_exit_gives_a_point_per_threshold(tmp_path):
    plan = _run({("Q", "E"): 1.0}, "QE", tmp_path)
    assert plan.order == "QE"
    e = plan.pairwise["QE"]
    assert len(e.points["QE"]) == len(TINY.Q) * len(TINY.E)
    assert {p["threshold"] for p in e.points["EQ"]} == set(TINY.E)
    assert [r["sequence"] for r in plan.table] == ["QE", "EQ"], "two methods: both orders are in the table"


def test_the_grid_s_old_name_still_works_with_a_warning():
    penalty = {("P", "Q"): 1.0}
    plan = search_order(_model(), None, None, "PQ", runner=Planted(penalty), verbose=False, **PAIRS_ONLY)
    assert plan.grid == PRESETS["small"]
    with pytest.warns(DeprecationWarning, match=r"search_order\(budget=...\) is now grid=..."):
        old = search_order(_model(), None, None, "PQ", budget=TINY, runner=Planted(penalty), verbose=False,
                           **PAIRS_ONLY)
    assert old.grid == TINY and old.order == "PQ"


def test_planted_tie_lists_every_consistent_order():
    plan = _run({("D", "P"): 2.0, ("D", "Q"): 2.0}, "DPQ")
    assert not plan.unique and set(plan.orders_consistent) == {"DPQ", "DQP"}
    assert plan.pairwise["PQ"].winner is None and plan.order in plan.orders_consistent


def test_planted_cycle_is_reported_with_its_weakest_edge(tmp_path, capsys):
    penalty = {("D", "P"): 3.0, ("P", "Q"): 2.0, ("Q", "D"): 0.5}
    plan = search_order(_model(), None, None, "DPQ", TINY, runner=Planted(penalty), out=tmp_path)
    assert plan.cycles == [{"cycle": "D->P->Q->D", "weakest": "Q->D", "margin": pytest.approx(0.5)}]
    assert plan.order == "DPQ" and plan.unique
    assert "dropped its weakest edge Q->D" in capsys.readouterr().out
    assert "cycle D->P->Q->D" in str(plan)


def test_cache_hit_does_not_call_the_runner_again(tmp_path):
    penalty = {("P", "Q"): 1.0}
    first = Planted(penalty)
    plan = _run(penalty, "PQ", tmp_path, runner=first, **PAIRS_ONLY)
    # root, P x2, Q x2, PQ x4, QP x4
    assert len(first.calls) == 1 + 2 + 2 + 4 + 4
    again = Planted(penalty)
    replay = _run(penalty, "PQ", tmp_path, runner=again, **PAIRS_ONLY)
    assert again.calls == [] and replay.runs["executed"] == 0
    assert replay.to_dict()["pairwise"] == plan.to_dict()["pairwise"]
    other = Planted(penalty)
    _run(penalty, "PQ", tmp_path, runner=other, config={"train": {"lr": 0.01}}, **PAIRS_ONLY)
    assert len(other.calls) == len(first.calls), "a different config must not hit the cache"


@pytest.mark.parametrize("change,words", [
    (lambda r: "{", "not valid JSON"),
    (lambda r: dict(r, points=None), "'points' must be a list"),
    (lambda r: dict(r, key="another"), "holds run 'another'"),
    (lambda r: dict(r, points=[dict(r["points"][0], accuracy="high")]), "point 1: 'accuracy' must be a number"),
])
def test_a_tampered_cached_run_is_refused_in_one_line(tmp_path, change, words):
    penalty = {("P", "Q"): 1.0}
    _run(penalty, "PQ", tmp_path, runner=Planted(penalty), **PAIRS_ONLY)
    cached = sorted((tmp_path / "runs").glob("*.json"))[0]
    record = json.loads(cached.read_text())
    changed = change(record)
    cached.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(BadFileError, match=words) as caught:
        _run(penalty, "PQ", tmp_path, runner=Planted(penalty), **PAIRS_ONLY)
    assert cached.name in str(caught.value) and "delete that file" in str(caught.value)


def test_resume_after_a_crash_runs_only_what_is_missing(tmp_path):
    penalty = {("P", "Q"): 1.0}
    crashing = Planted(penalty, fail_at=7)
    with pytest.raises(RuntimeError, match="planted crash"):
        _run(penalty, "PQ", tmp_path, runner=crashing, **PAIRS_ONLY)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 6
    resumed = Planted(penalty)
    plan = _run(penalty, "PQ", tmp_path, runner=resumed, **PAIRS_ONLY)
    assert len(resumed.calls) == 13 - 6
    assert plan.order == "PQ" and plan.pairwise["PQ"].winner == "PQ"


@pytest.mark.slow
def test_a_crash_in_a_worker_keeps_the_finished_runs(tmp_path):
    penalty = {("P", "Q"): 1.0}
    with pytest.raises(RuntimeError, match="planted crash"):
        _run(penalty, "PQ", tmp_path, runner=Planted(penalty, fail_at=3), workers=2)
    finished = len(list((tmp_path / "runs").glob("*.json")))
    assert 1 <= finished < 13
    resumed = Planted(penalty)
    assert _run(penalty, "PQ", tmp_path, runner=resumed, **PAIRS_ONLY).order == "PQ"
    assert len(resumed.calls) == 13 - finished


@pytest.mark.slow
def test_workers_give_the_same_plan(tmp_path):
    penalty = {("D", "P"): 2.0, ("P", "Q"): 1.0, ("D", "Q"): 0.1}
    one = _run(penalty, "DPQ", tmp_path / "one").to_dict()
    two = _run(penalty, "DPQ", tmp_path / "two", workers=2).to_dict()
    for plan in (one, two):
        plan.pop("runs")
        for e in plan["pairwise"].values():
            for pts in list(e["points"].values()) + list(e["fronts"].values()):
                for p in pts:
                    p.pop("run", None)
    assert one == two and one["order"] == "DPQ"


def test_insertion_check_keeps_the_pair_order():
    plan = _run({("P", "Q"): 1.5, ("D", "P"): 1.0, ("D", "Q"): 1.0}, "DPQ", insertion=True)
    checks = {(c["first"], c["inserted"], c["second"]): c for c in plan.insertion}
    assert set(checks) == {("D", "Q", "P"), ("D", "P", "Q"), ("P", "D", "Q")}
    assert all(c["verdict"] == "kept" for c in checks.values())


def test_command_line_trains_the_teacher_and_passes_the_settings(tmp_path, monkeypatch):
    import argparse

    import numpy as np

    from ordercomp.cli import search_order as command

    rng = np.random.default_rng(0)
    npz = tmp_path / "digits.npz"
    np.savez(npz, x_train=rng.integers(0, 255, (32, 28, 28), dtype=np.uint8), y_train=rng.integers(0, 10, 32),
             x_test=rng.integers(0, 255, (16, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 16))
    seen = {}

    def fake_search(model, train, val, methods, grid, **kw):
        seen.update(model=model, train=train(), val=val(), methods=methods, grid=grid, **kw)
        return "planted plan"

    monkeypatch.setattr(command, "search_order", fake_search)
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "search"
    args = parser.parse_args(["search-order", "--model", "resnet8", "--data", "npz", "--data-root", str(npz),
                              "--methods", "PQ", "--grid", "2", "--workers", "2", "--sequences", "PQ,QP",
                              "--teacher-epochs", "1", "--max-batches", "1", "--out", str(out), "--quiet",
                              "--seeds", "2", "--no-repetition"])
    assert args.func(args) == 0
    assert (out / "teacher.pt").exists(), "a fresh zoo model is trained first and kept for a rerun"
    assert seen["methods"] == "PQ" and seen["grid"] == 2 and seen["workers"] == 2
    assert seen["sequences"] == ["PQ", "QP"] and seen["out"] == out and seen["verbose"] is False
    assert seen["seeds"] == 2 and seen["repetition"] is False and seen["insertion"] is True  # the check's default
    assert seen["config"].train.max_batches == 1 and seen["config"].calibration_fraction == 0.1
    assert len(seen["train"].dataset) == 32 and len(seen["val"].dataset) == 16


# ---------------------------------------------------------------------------------------------
# one real search through compress()


@pytest.mark.slow
def test_real_search_on_mnist(mnist_small, tmp_path):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=128)
    model = _model()
    ordercomp.train.Trainer(ordercomp.train.TrainConfig(epochs=1, max_batches=4, progress=False)).fit(model, train)
    grid = SearchGrid(P=(0.5,), Q=((4, 8),))
    plan = search_order(model, train, val, "PQ", grid, epochs=1, max_batches=2, out=tmp_path, verbose=False)
    assert set(plan.pairwise) == {"PQ"} and plan.order in ("PQ", "QP")
    e = plan.pairwise["PQ"]
    for order in ("PQ", "QP"):
        (point,) = e.points[order]
        assert 0 <= point["accuracy"] <= 100 and point["bitops_cr"] > 30, "P(0.5) and 4w8a cut BitOps far more than 30x"
        correct = ordercomp.stats.unpack_correct(point["correct"])  # measured on the 128 held-out digits
        assert len(correct) == 128 and point["accuracy"] == pytest.approx(100 * float(correct.double().mean()))
    assert e.points["PQ"][0]["bitops_cr"] == pytest.approx(e.points["QP"][0]["bitops_cr"], rel=0.05)
    assert math.isclose(plan.original_accuracy, json.loads((tmp_path / "search.json").read_text())["original_accuracy"])
    assert e.interval is not None and e.interval[0] <= e.margin <= e.interval[1]
    assert {c["repeated"] for c in plan.repetition} == {"PP", "QQ", plan.order + plan.order[-1]}
    assert len(list((tmp_path / "models").glob("*.pt"))) >= 2, "the P and Q prefixes are saved for reuse"
    assert (tmp_path / "pairs" / "PQ.png").exists()


@pytest.mark.slow
def test_each_run_can_use_torchrun(tmp_path):
    """--nproc-per-run 2: every run is a 2-process torchrun of compress (DDP on gloo), results cached as usual."""
    import os
    import subprocess
    import sys

    import numpy as np

    from conftest import MNIST_DATA, REPO
    from ordercomp import models

    with np.load(MNIST_DATA) as npz:
        np.savez(tmp_path / "digits.npz", x_train=npz["x_train"][:256], y_train=npz["y_train"][:256],
                 x_test=npz["x_test"][:128], y_test=npz["y_test"][:128])
    torch.manual_seed(0)
    torch.save(models.create("resnet8", num_classes=10, in_channels=1), tmp_path / "teacher.pt")  # the user's file
    out = tmp_path / "search"
    command = [sys.executable, "-m", "ordercomp", "search-order", "--model-file", str(tmp_path / "teacher.pt"),
               "--methods", "PQ", "--grid", "tiny", "--nproc-per-run", "2", "--epochs", "1", "--max-batches", "2",
               "--data", "npz", "--data-root", str(tmp_path / "digits.npz"), "--batch-size", "64",
               "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in (out / "torchrun").glob("*/report.json")]
    assert len(reports) >= 4 and all(r["world_size"] == 2 for r in reports)
    assert {r["order"] for r in reports} == {"P", "Q"}
    assert "PQ" in proc.stdout and (out / "search.json").is_file()
    handed_off = sorted(out.rglob("*.pt"))  # prefixes, derived students, each run's models
    assert len(handed_off) >= 6
    for f in handed_off:
        assert torch.load(f, weights_only=True)["format"] == "ordercomp-result", f


# ---------------------------------------------------------------------------------------------
# confidence: intervals over the held-out inputs and the seeds, the order's confidence, the checks


def _point(correct: torch.Tensor, cr: float, **extra):
    """A point measured on held-out inputs: its accuracy is the share it gets right."""
    return {"accuracy": 100.0 * float(correct.double().mean()), "bitops_cr": cr,
            "correct": ordercomp.stats.pack_correct(correct), **extra}


def _answers(n: int, accuracy: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) < accuracy / 100


def test_a_margin_s_interval_is_the_paired_interval_of_the_accuracy_gap():
    """One point each at the same BitOpsCR: the fronts' gap is the accuracy difference, so its
    bootstrap interval is the paired interval of the two models' answers (computed by hand)."""
    from ordercomp.search.evidence import Resampling

    n = 2000
    a = _answers(n, 92, 1)
    b = a & ~_answers(n, 2.2, 2)  # about 2 pp fewer right, on the same inputs
    e = compare("PQ", [_point(a, 10.0)], [_point(b, 10.0)], 95.0, resampling=Resampling(n))
    d = a.double() - b.double()
    half = 1.959964 * float(d.std()) / math.sqrt(n)
    assert e.margin == pytest.approx(100 * float(d.mean()))
    assert e.interval[0] == pytest.approx(100 * (float(d.mean()) - half), abs=0.15)
    assert e.interval[1] == pytest.approx(100 * (float(d.mean()) + half), abs=0.15)
    assert e.decisive and e.winner == "PQ" and "95 % interval [+" in e.verdict()
    assert len(e.resampled) == 1000 and e.to_dict()["interval"] == list(e.interval)
    # two answers in 60 (3.3 pp) cannot be told from a tie: the interval holds 0
    a, b = torch.ones(60, dtype=torch.bool), torch.ones(60, dtype=torch.bool)
    b[:2] = False
    small = compare("PQ", [_point(a, 10.0)], [_point(b, 10.0)], 95.0, resampling=Resampling(60))
    assert small.margin == pytest.approx(100 * 2 / 60)
    assert small.interval[0] <= 0 < small.interval[1] and not small.decisive and small.winner is None
    assert compare("PQ", [_point(a, 10.0)], [_point(b, 10.0)], 95.0).winner == "PQ", "without the interval: decisive"


def test_theresampled_gaps_equal_front_gap_on_every_resample():
    from ordercomp.search.evidence import Resampling, resampled_gaps

    n = 300
    ab = [_point(_answers(n, acc, i), cr) for i, (acc, cr) in enumerate([(91, 1.0), (88, 30.0), (80, 400.0)])]
    ba = [_point(_answers(n, acc, 10 + i), cr) for i, (acc, cr) in enumerate([(90, 3.0), (86, 50.0)])]
    resampling = Resampling(n, resamples=5)
    acc_a, acc_b = resampling.accuracies(ab), resampling.accuracies(ba)
    gaps = resampled_gaps(ab, ba, acc_a, acc_b)
    for r in range(5):
        redrawn = ([dict(p, accuracy=float(acc_a[i, r])) for i, p in enumerate(ab)],
                   [dict(p, accuracy=float(acc_b[i, r])) for i, p in enumerate(ba)])
        assert gaps[r] == pytest.approx(front_gap(*redrawn)[1], abs=1e-4)


def test_seeds_that_disagree_make_a_verdict_unsure():
    """Two seeds: each, on its own, tightly for PQ by 2 pp and for QP by 1 pp; together the margin
    is +0.5 pp and the interval, folding in the seeds' spread, holds 0."""
    from ordercomp.search.evidence import Resampling

    n = 4000
    base = _answers(n, 90, 0)
    better = base | _answers(n, 20, 1)  # about 2 pp more, on top of the same answers
    worse = base & ~_answers(n, 1.1, 2)  # about 1 pp less
    ab = [_point(better, 10.0, seed=0), _point(worse, 10.0, seed=1)]
    ba = [_point(base, 10.0, seed=0), _point(base, 10.0, seed=1)]
    e = compare("PQ", ab, ba, 95.0, resampling=Resampling(n, seeds=2))
    per_seed = [compare("PQ", [p], [q], 95.0, resampling=Resampling(n)) for p, q in zip(ab, ba)]
    assert per_seed[0].winner == "PQ" and per_seed[1].winner == "QP"
    assert e.seeds == 2 and e.margin == pytest.approx((per_seed[0].margin + per_seed[1].margin) / 2)
    assert e.interval[0] < 0 < e.interval[1] and e.winner is None


class Answering(Planted):
    """:class:`Planted` with each point's answers on 1 000 held-out inputs: an input is right when
    its difficulty (fixed per input, and per seed when ``noise``) is below the point's accuracy."""

    def __init__(self, penalty, noise=0.0, **kw):
        super().__init__(penalty, **kw)
        self.noise = noise

    def __call__(self, spec):
        points = super().__call__(spec)
        difficulty = torch.rand(1000, generator=torch.Generator().manual_seed(0))
        if self.noise:
            jitter = torch.rand(1000, generator=torch.Generator().manual_seed(1 + spec.seed + zlib.crc32(spec.label.encode())))
            difficulty = (1 - self.noise) * difficulty + self.noise * jitter
        out = []
        for p in points:
            correct = difficulty < p["accuracy"] / 100
            out.append(dict(_point(correct, p["bitops_cr"]), **{k: v for k, v in p.items() if k == "threshold"}))
        return out


def test_a_planted_search_gives_intervals_its_confidence_and_the_paper_s_checks(tmp_path):
    penalty = {("D", "P"): 2.0, ("D", "Q"): 2.0, ("P", "Q"): 1.0}
    plan = _run(penalty, "DPQ", tmp_path, runner=Answering(penalty))
    assert plan.order == "DPQ" and plan.confidence == 1.0
    for e in plan.pairwise.values():
        assert e.decisive and (e.interval[0] > 0 or e.interval[1] < 0)
    # insertion is on by default: every decisive pair keeps its order with a third method between
    assert {(c["first"], c["inserted"], c["second"]): c["verdict"] for c in plan.insertion} == {
        ("D", "Q", "P"): "kept", ("D", "P", "Q"): "kept", ("P", "D", "Q"): "kept"}
    assert all(c["interval"] is not None for c in plan.insertion)
    # repetition: a second D, P or Q costs its accuracy again for more BitOpsCR; the check says which
    reps = {c["repeated"]: c for c in plan.repetition}
    assert set(reps) == {"DD", "PP", "QQ", "DPQQ"} and reps["DPQQ"]["once"] == "DPQ"
    assert all(c["verdict"] in ("helps", "hurts", "no gain") and c["interval"] for c in reps.values())
    row = plan.table[0]
    assert row["sequence"] == "DPQ" and set(row["interval"]) == {"0.2", "0.6", "1.0", "2.0"}
    for key, (low, high) in row["interval"].items():
        assert low <= (row["best_cr"][key] or 1.0) <= high
    text = str(plan)
    assert "100 % of bootstrap resamples sort to it" in text and "repetition DD against D" in text
    assert "% interval" in (tmp_path / "summary.txt").read_text() and "[" in (tmp_path / "table.md").read_text()
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["confidence"] == 1.0 and saved["pairwise"]["DP"]["interval"] == list(plan.pairwise["DP"].interval)


def test_a_weak_pair_lowers_the_order_s_confidence():
    """P before Q by only 0.25 pp on noisy answers: some resamples call it a tie (and then the
    tie-break may sort Q first), so fewer than all resamples give the order found."""
    penalty = {("D", "P"): 2.0, ("D", "Q"): 2.0, ("P", "Q"): 0.25}
    plan = _run(penalty, "DPQ", runner=Answering(penalty, noise=0.6), insertion=False, repetition=False)
    assert plan.pairwise["DP"].decisive and plan.pairwise["DQ"].decisive
    assert 0.0 < plan.confidence < 1.0


def test_seeds_repeat_every_run_and_keep_seed_0_s_cache(tmp_path):
    penalty = {("P", "Q"): 1.0}
    one = Answering(penalty)
    _run(penalty, "PQ", tmp_path, runner=one, insertion=False, repetition=False)
    two = Answering(penalty)
    plan = _run(penalty, "PQ", tmp_path, runner=two, insertion=False, repetition=False, seeds=2)
    assert len(two.calls) == len(one.calls), "seed 0's runs come from the cache, seed 1's run afresh"
    assert plan.seeds == 2 and plan.pairwise["PQ"].seeds == 2 and plan.order == "PQ"
    assert {p["seed"] for p in plan.pairwise["PQ"].points["PQ"]} == {0, 1}


# ---------------------------------------------------------------------------------------------
# order="auto": compress searches first


@pytest.mark.slow
def test_compress_with_order_auto_searches_first_then_runs_the_order_found(mnist_small, tmp_path):
    xtr, ytr, xte, yte = mnist_small
    train = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=128)
    config = {"order": "auto", "search": {"methods": "qp", "grid": "tiny", "repetition": False},
              "train": {"epochs": 1, "max_batches": 2, "progress": False}, "calibration_fraction": 0.25}
    result = ordercomp.compress(_model(), train, val, config, out=tmp_path / "run")
    search = result.report["order_search"]
    assert search["order"] in ("PQ", "QP") and result.report["order"] == search["order"]
    assert [s["stage"] for s in result.report["stages"]] == list(search["order"])
    assert search["methods"] == "QP" and set(search["verdicts"]) == {"QP"} and search["executed"] == search["runs"] == 5
    assert search["measured_on"] == "the calibration data (64 inputs)", "never the validation data it reports on"
    assert result.report["config"]["order"] == "auto" and (tmp_path / "run" / "search" / "search.json").is_file()
    assert f"order {search['order']} chosen by an order search of QP (grid tiny" in str(result)
    assert "order search of QP" in (tmp_path / "run" / "report.md").read_text()
    # resumed (here: already finished), the search's runs come from its cache and give the same order
    again = ordercomp.compress(_model(), train, val, config, out=tmp_path / "run", resume=True)
    assert again.report["order_search"]["executed"] == 0 and again.report["order"] == search["order"]


def test_the_order_auto_is_reserved_and_needs_calibration_data(mnist_small):
    from ordercomp.stages import Stage, parse_order, register_stage, unregister_stage

    assert parse_order("Auto", auto=True) == "auto"
    with pytest.raises(ConfigError, match="asks for an order search"):
        ordercomp.stages.plan_order("auto")
    made = []
    try:
        for letter in "AUT":
            made.append(register_stage(type(f"Stage{letter}", (Stage,), {"letter": letter, "__annotations__": {}})))
        with pytest.raises(ConfigError, match="would let registered letters spell the order 'auto'"):
            register_stage(type("StageO", (Stage,), {"letter": "O", "__annotations__": {}}))
    finally:
        for cls in made:
            unregister_stage(cls.letter)
    xtr, ytr = mnist_small[0][:64], mnist_small[1][:64]
    loader = DataLoader(TensorDataset(xtr, ytr), batch_size=32)
    with pytest.raises(ConfigError, match="order 'auto' chooses the order on calibration data"):
        ordercomp.compress(_model(), loader, loader, {"order": "auto", "calibration_fraction": 0})


# ---------------------------------------------------------------------------------------------
# a Ray cluster: the same plan as one process, a lost worker's run run again


class Dying(Answering):
    """:class:`Answering` whose worker process dies (once, the first time) on the run of PQ."""

    def __init__(self, penalty, flag):
        super().__init__(penalty)
        self.flag = str(flag)

    def __call__(self, spec):
        import os

        if spec.order == "PQ" and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(1)
        return super().__call__(spec)


def _comparable(plan) -> dict:
    out = plan.to_dict()
    out.pop("runs")
    return json.loads(json.dumps(out, default=str).replace(str(plan.out), "OUT") if plan.out else json.dumps(out))


def _without_run_keys(d):
    if isinstance(d, dict):
        return {k: _without_run_keys(v) for k, v in d.items() if k != "run"}
    if isinstance(d, list):
        return [_without_run_keys(v) for v in d]
    return d


@pytest.mark.slow
def test_a_ray_cluster_gives_the_local_plan_and_runs_a_lost_worker_s_run_again(mnist_small, tmp_path):
    import os

    ray = pytest.importorskip("ray")
    from conftest import REPO

    tests = str(REPO / "tests")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests, str(REPO)])}})
    threads = torch.get_num_threads()
    try:
        penalty = {("D", "P"): 2.0, ("P", "Q"): 1.0, ("D", "Q"): 0.5}
        local = _run(penalty, "DPQ", tmp_path / "local", runner=Answering(penalty))
        remote = _run(penalty, "DPQ", tmp_path / "ray", runner=Dying(penalty, tmp_path / "died"), executor="ray")
        assert (tmp_path / "died").exists(), "the worker running PQ died once; its run was run again"
        assert _without_run_keys(_comparable(remote)) == _without_run_keys(_comparable(local))
        assert remote.order == "DPQ" and remote.runs["executed"] == remote.runs["total"]
        again = _run(penalty, "DPQ", tmp_path / "ray", runner=Answering(penalty), executor="ray")
        assert again.runs["executed"] == 0, "the cache is the local executor's"
        # a tiny real search: prefix models travel as bytes to the tasks that continue them
        xtr, ytr, xte, yte = mnist_small
        train = DataLoader(TensorDataset(xtr[:256], ytr[:256]), batch_size=64, shuffle=True)
        val = DataLoader(TensorDataset(xte[:128], yte[:128]), batch_size=128)
        grid = SearchGrid(P=(0.5,), Q=((4, 8),))
        torch.set_num_threads(1)  # as each task runs
        real = {name: search_order(_model(), train, val, "PQ", grid, epochs=1, max_batches=2, out=tmp_path / name,
                                   verbose=False, repetition=False, **kw)
                for name, kw in (("real_local", {}), ("real_ray", {"executor": "ray"}))}
        assert _without_run_keys(_comparable(real["real_ray"])) == _without_run_keys(_comparable(real["real_local"]))
        assert len(list((tmp_path / "real_ray" / "models").glob("*.pt"))) == 4  # P, Q, PQ, QP kept, sent back
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
