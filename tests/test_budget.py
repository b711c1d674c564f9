"""The accuracy budget: the controller's search against stages whose losses are known, then real
runs (the command line and compress()) that respect the budget on calibration data, say when it
cannot be met, and resume without repeating finished probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.errors import ConfigError
from ordercomp.pipeline import CompressConfig, Lineage, compress
from ordercomp.pipeline import budget as budget_module
from ordercomp.pipeline.budget import BudgetConfig, Controller, ProbeStore
from ordercomp.report import format_table, markdown
from ordercomp.stages import Context, Distill, EarlyExit, Prune, Quantize, StageResult, channel_counts

from conftest import MNIST_DATA, REPO

BASELINE = 99.0
HANDICAP = 0.7  # what a probe's short training costs in these fake stages: the estimate must cancel it


class _Net(nn.Module):
    """A model that carries the loss the fake stages gave it (a buffer, so result files keep it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)
        self.register_buffer("spent", torch.zeros(()))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def _stage_loss(stage) -> float:
    """The loss each fake stage adds: grows with the strength, known in closed form."""
    if isinstance(stage, Prune):
        return 0.1 + 4 * max(0.0, stage.ratio - 0.4)
    if isinstance(stage, Quantize):
        return (8 - stage.w_bits) * 0.15 + (8 - stage.a_bits) * 0.2
    if isinstance(stage, EarlyExit):
        return stage.max_accuracy_loss  # E spends all it is allowed
    raise AssertionError(stage)


class _FakeRuns:
    """Replaces the controller's ``run_stage``: records every call, can fail after ``fail_after`` calls."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after, self.e_settings = [], fail_after, []

    def __call__(self, stage, model, context, exit_settings=None, lineage=None):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("killed")
        short = context.train.epochs == 1
        self.calls.append((stage.letter, short))
        if isinstance(stage, EarlyExit):
            self.e_settings.append(stage)
        model.spent += _stage_loss(stage)
        accuracy = BASELINE - float(model.spent) - (HANDICAP if short else 0.0)
        strength = getattr(stage, "ratio", 0) + (16 - getattr(stage, "w_bits", 8) - getattr(stage, "a_bits", 8))
        return StageResult(stage.letter, model, accuracy, 0.01, macs=1.0, params=1, bitops=1.0,
                           bitops_cr=1.0 + strength, cr=1.0, info={"calibration_accuracy": accuracy},
                           correct=torch.ones(8, dtype=torch.bool))


@pytest.fixture
def context():
    x = torch.randn(16, 1, 8, 8)
    loader = DataLoader(TensorDataset(x, torch.arange(16) % 10), batch_size=8)
    return Context.create(_Net(), loader, loader, ordercomp.train.TrainConfig(epochs=3, progress=False))


def _run(controller, order, context):
    model = _Net()
    plan = [{"P": Prune(), "Q": Quantize(), "E": EarlyExit()}[letter] for letter in order]
    out = list(controller.run(model, plan, context, Lineage.of(model)))
    return out, plan


def _controller(target, store=None, **budget):
    return Controller(BudgetConfig(**budget), target, BASELINE, seed=lambda step, salt: None, store=store,
                      original=_Net())


def test_search_picks_the_strongest_strengths_within_each_share_of_the_budget(context, monkeypatch):
    runs = _FakeRuns()
    monkeypatch.setattr(budget_module, "run_stage", runs)
    controller = _controller(2.0)
    out, plan = _run(controller, "PQE", context)
    decisions = [d for *_, d in out]
    # P may use a third of 2 pp: ratio 0.5 costs 0.5 pp, 0.6 would cost 0.9.
    assert decisions[0]["allowance"] == pytest.approx(2 / 3)
    assert decisions[0]["strength"] == {"ratio": 0.5} and decisions[0]["loss"] == pytest.approx(0.5)
    # Q may bring it to 0.5 + 1.5 / 2 = 1.25: 3-bit weights cost 0.75 (1.25 in all), 2-bit 0.9, 6-bit activations +0.4.
    assert decisions[1]["allowance"] == pytest.approx(1.25)
    assert decisions[1]["strength"] == {"w_bits": 3, "a_bits": 8} and decisions[1]["within"]
    # E gets the rest of the budget, against the original's calibration accuracy.
    assert decisions[2]["allowance"] == pytest.approx(2.0)
    assert runs.e_settings[0].max_accuracy_loss == pytest.approx(2.0) and runs.e_settings[0].baseline == BASELINE
    assert plan[1].w_bits == 3 and plan[0].ratio == 0.5
    # A probe's estimate cancels its short training: anchor loss + anchor probe - probe.
    probes = [e for e in controller.entries if e["kind"] == "probe"]
    for e in probes:
        stage = Prune(ratio=e["strength"]["ratio"]) if e["stage"] == "P" else Quantize(**e["strength"])
        before = 0.0 if e["stage"] == "P" else 0.5
        assert e["estimated_loss"] == pytest.approx(before + _stage_loss(stage))
    # Every varied setting was probed at 3 strengths at least.
    for stage, setting in (("P", "ratio"), ("Q", "w_bits"), ("Q", "a_bits")):
        assert len({e["strength"][setting] for e in probes if e["stage"] == stage}) >= 3
    # The search moved by halving steps: ratio 0.5 (within), 0.7 (not), 0.6 (not), then stopped.
    assert [e["strength"]["ratio"] for e in probes if e["stage"] == "P"] == [0.5, 0.7, 0.6]
    # Anchors (P, Q, E), the probes, and one more full run: Q at 3 bits.
    fulls = [(e["stage"], e["strength"]) for e in controller.entries if e["kind"] == "full" and not e["anchor"]]
    assert fulls == [("Q", {"w_bits": 3, "a_bits": 8})]
    assert len(runs.calls) == len(controller.entries) == 3 + len(probes) + 1


def test_a_budget_that_cannot_be_met_keeps_the_least_lossy_strengths_and_says_so(context, monkeypatch):
    monkeypatch.setattr(budget_module, "run_stage", _FakeRuns())
    controller = _controller(0.0)
    out, _ = _run(controller, "PQ", context)
    decisions = [d for *_, d in out]
    assert decisions[0]["strength"] == {"ratio": 0.2}  # the weakest: 0.1 pp, no ratio costs less
    assert decisions[1]["strength"] == {"w_bits": 8, "a_bits": 8}
    assert not any(d["within"] for d in decisions)
    report = {"order": "PQ", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [], "budget": dict(controller.summary(decisions), done=True)}
    assert report["budget"]["met"] is False and report["budget"]["calibration_loss"] == pytest.approx(0.1)
    assert "BUDGET NOT MET: calibration loss +0.10 pp > 0 pp" in format_table(report)
    assert "| 1 | P | probe | ratio=0.2 |" in markdown(report)


def test_max_probes_and_time_budget_bound_the_search(context, monkeypatch):
    monkeypatch.setattr(budget_module, "run_stage", _FakeRuns())
    controller = _controller(2.0, max_probes=2)
    out, _ = _run(controller, "PQ", context)
    assert sum(not e["anchor"] for e in controller.entries) == 2
    assert controller.stopped == "max_probes (2) reached"
    assert [d["strength"] for *_, d in out] == [{"ratio": 0.5}, {"w_bits": 4, "a_bits": 8}]  # as configured
    controller = _controller(2.0, time_budget=0)
    _run(controller, "PQ", context)
    assert all(e["anchor"] for e in controller.entries) and "time_budget" in controller.stopped


def test_a_killed_budgeted_run_resumes_without_repeating_finished_probes(context, monkeypatch, tmp_path):
    store = ProbeStore(tmp_path / "probes", [1, 8, 8])
    monkeypatch.setattr(budget_module, "run_stage", _FakeRuns(fail_after=6))
    with pytest.raises(RuntimeError, match="killed"):
        _run(_controller(2.0, store=store), "PQ", context)
    assert len(store.entries()) == 6 and (tmp_path / "probes" / "0-full-ratio0.5.pt").is_file()
    runs = _FakeRuns()
    monkeypatch.setattr(budget_module, "run_stage", runs)
    resumed = _controller(2.0, store=store)
    out, _ = _run(resumed, "PQ", context)
    assert len(runs.calls) == len(resumed.entries) - 6  # none of the 6 finished runs again
    fresh_runs = _FakeRuns()
    monkeypatch.setattr(budget_module, "run_stage", fresh_runs)
    fresh = _controller(2.0)
    fresh_out, _ = _run(fresh, "PQ", context)
    assert [d for *_, d in out] == [d for *_, d in fresh_out]
    keep = ("key", "strength", "calibration_accuracy", "loss")
    assert [{k: e[k] for k in keep} for e in resumed.entries] == [{k: e[k] for k in keep} for e in fresh.entries]
    assert float(out[0][2].spent) == pytest.approx(0.9)  # P at 0.6 fits its 1 pp
    # A finished full run comes back from its result file: the model, its measurements, its per-input results.
    anchor = next(e for e in store.entries() if e["key"] == "0-full-ratio0.5")
    result, lineage = store.load_full(anchor, _Net(), None, context)
    assert float(result.model.spent) == pytest.approx(0.5) and result.accuracy == pytest.approx(BASELINE - 0.5)
    assert result.correct.dtype == torch.bool and result.correct.all() and lineage.base["class"].endswith("_Net")


def test_budget_settings_are_checked():
    with pytest.raises(ConfigError, match=r"budget.ratios\[1\]"):
        BudgetConfig(ratios=(0.2, 1.5))
    with pytest.raises(ConfigError, match="budget.w_bits"):
        BudgetConfig(w_bits=(4, 9))
    with pytest.raises(ConfigError, match="budget.max_probes"):
        BudgetConfig(max_probes=-1)
    with pytest.raises(ConfigError, match="must not repeat"):
        BudgetConfig(widths=(1.0, 1.0))
    with pytest.raises(ConfigError, match="budget.shares"):
        CompressConfig.from_dict({"budget": {"shares": {"P": 0}}})
    assert CompressConfig().override(["budget.max_probes=4"]).budget.max_probes == 4


# --- real runs ---------------------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run([sys.executable, "-m", "ordercomp", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def test_cli_budgeted_run_respects_its_budget_on_calibration_data(tmp_path):
    out = tmp_path / "run"
    proc = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--order", "PQ",
                "--teacher-epochs", "2", "--epochs", "1", "--max-batches", "3", "--batch-size", "64",
                "--calibration-fraction", "0.25", "--target-loss", "3", "--max-probes", "9", "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    budget = report["budget"]
    final = report["stages"][-1]
    loss = budget["baseline"] - final["calibration_accuracy"]
    assert budget["baseline"] == report["original"]["calibration_accuracy"]
    assert budget["calibration_loss"] == pytest.approx(loss) and budget["done"]
    assert budget["met"] == (loss <= 3 + 1e-9)
    assert ("budget met" if budget["met"] else "BUDGET NOT MET") in proc.stdout
    for d, stage in zip(budget["decisions"], report["stages"]):
        assert d["loss"] == pytest.approx(budget["baseline"] - stage["calibration_accuracy"])
    # What was chosen is what ran: the pruned channels and the bits of the final model.
    chosen = {k: v for d in budget["decisions"] for k, v in d["strength"].items()}
    assert report["stages"][0]["info"]["removed_fraction"] == pytest.approx(chosen["ratio"], abs=0.1)
    bits = report["stages"][1]["info"]["bits"]
    assert any(b == [chosen["w_bits"], chosen["a_bits"]] for b in bits.values())
    # Every run was reported with its stage, strength, calibration accuracy and seconds, and progress shown.
    probes = budget["probes"]
    assert sum(not p["anchor"] for p in probes) <= 9
    assert all({"stage", "strength", "calibration_accuracy", "seconds"} <= set(p) for p in probes)
    assert proc.stderr.count("step 1 P probe (ratio=") == sum(p["kind"] == "probe" and p["stage"] == "P" for p in probes)
    assert (out / "budget.png").stat().st_size > 10_000 and "![budget](budget.png)" in (out / "report.md").read_text()
    assert json.loads((out / "probes" / "probes.json").read_text())[0]["key"] == probes[0]["key"]


def test_compress_resumes_a_budgeted_run_without_repeating_its_probes(tmp_path, monkeypatch):
    # Real loaders, shuffled and augmented, shared by every run in this process: each run and probe
    # restarts their random streams, so a resumed run repeats an uninterrupted one.
    bundle = ordercomp.data.load("npz", MNIST_DATA, limit=256, batch_size=64, calibration_fraction=0.25)
    train, val = bundle.train_loader, bundle.val_loader
    torch.manual_seed(0)
    model = ordercomp.models.create("resnet8", num_classes=10, in_channels=1)
    settings = dict(order="PQ", epochs=1, max_batches=2, target_loss=5.0, progress=False,
                    calibration_loader=bundle.calibration_loader,
                    config={"budget": {"w_bits": [8, 4, 2], "a_bits": [8, 4]}})
    real = budget_module.run_stage
    calls = []

    def counted(*args, **kw):
        if len(calls) == kill_after:
            raise KeyboardInterrupt("killed")
        calls.append(args[0].letter)
        return real(*args, **kw)

    monkeypatch.setattr(budget_module, "run_stage", counted)
    kill_after = None
    fresh = compress(model, train, val, out=tmp_path / "fresh", **settings).report
    runs = fresh["budget"]["probes"]
    keep = ("key", "calibration_accuracy", "bitops_cr")
    calls.clear()  # a run that clears the directory (overwrite) starts its probes afresh
    again = compress(model, train, val, out=tmp_path / "fresh", overwrite=True, **settings).report["budget"]["probes"]
    assert len(calls) == len(runs) and [{k: e[k] for k in keep} for e in again] == [{k: e[k] for k in keep} for e in runs]
    # Killed in P's search, then in Q's (P finished and saved): the resumed run repeats no finished run.
    for kill_after in (3, sum(p["stage"] == "P" for p in runs) + 2):
        out = tmp_path / f"killed{kill_after}"
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            compress(model, train, val, out=out, **settings)
        calls.clear()
        kill_after, killed_at = None, kill_after
        resumed = compress(model, train, val, out=out, resume=True, **settings).report
        assert len(calls) == len(runs) - killed_at
        assert [{k: e[k] for k in keep} for e in resumed["budget"]["probes"]] == [{k: e[k] for k in keep} for e in runs]
        chosen = [[d["strength"] for d in r["budget"]["decisions"]] for r in (resumed, fresh)]
        assert chosen[0] == chosen[1]
        assert resumed["stages"][-1]["calibration_accuracy"] == fresh["stages"][-1]["calibration_accuracy"]


def test_distill_width_thins_a_zoo_student_and_defaults_to_it_as_built():
    x = torch.zeros(2, 1, 28, 28)
    teacher = ordercomp.models.create("resnet20", num_classes=10, in_channels=1)
    loader = DataLoader(TensorDataset(x, torch.zeros(2, dtype=torch.long)), batch_size=2)
    context = Context.create(teacher, loader, loader)
    full = channel_counts(Distill().build_student(teacher, context)[0])
    assert full == channel_counts(ordercomp.models.create("resnet8", num_classes=10, in_channels=1))
    half, architecture = Distill(width=0.5).build_student(teacher, context)
    assert architecture["zoo"] == "resnet8"
    thinned = channel_counts(half)
    stem = next(iter(full))
    assert thinned[stem] == full[stem] // 2 and sum(thinned.values()) < 0.6 * sum(full.values())
    assert Distill().student_width(context.spec) == 1.0 and Distill().student_width(None) == 0.5
    with pytest.raises(ConfigError, match="width"):
        Distill(width=0)
