"""The accuracy budget: the margin rule against a hand computation, the controller's search against
stages whose losses are known, then real runs (the command line and compress()) that respect the
budget on calibration data, say when it cannot be met, and resume without repeating finished probes."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.errors import ConfigError, DataError
from ordercomp.pipeline import CompressConfig, Lineage
from ordercomp.pipeline import budget as budget_module
from ordercomp.errors import BadFileError
from ordercomp.pipeline.budget import BudgetConfig, Controller, ProbeStore
from ordercomp.pipeline.shares import smallest_part
from ordercomp.pipeline.probes import SharedProbes
from ordercomp.report import format_table, markdown
from ordercomp.stages import (NO_EXIT, Context, Distill, EarlyExit, Prune, Quantize, StageResult, SweepPoint,
                              channel_counts, threshold_choice)

from conftest import MNIST_DATA, REPO, config_of

BASELINE = 99.0
HANDICAP = 0.7  # what a probe's short training costs in these fake stages: the estimate must cancel it
CALIBRATION = 1000  # calibration inputs of the fake runs: the original gets all right, a run loses 0.1 pp an input
Z95 = statistics.NormalDist().inv_cdf(0.95)
# What P's channel multiple (rounded up) costs the fake runs, and how much faster it makes them (BitOps
# do not see it)
MULTIPLE_LOSS = {1: 0.0, 2: 0.01, 4: 0.02, 8: 0.05, 16: 0.5}
MULTIPLE_SPEED = {1: 1.0, 2: 1.0, 4: 1.1, 8: 1.3, 16: 1.35}


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
        return 0.1 + 4 * max(0.0, stage.ratio - 0.4) + MULTIPLE_LOSS[stage.round_up_to]
    if isinstance(stage, Quantize):
        return (8 - stage.w_bits) * 0.15 + (8 - stage.a_bits) * 0.2
    raise AssertionError(stage)


def _exit_loss(stage, spent: float) -> float:
    """What the fake E adds: it takes the threshold whose loss (against the original, in whole
    calibration inputs) plus its margin at the stage's confidence is the most within its bound."""
    lost = round(spent * CALIBRATION / 100)
    while (lost + 1) / 10 + _margin(lost + 1, stage.confidence) <= stage.max_accuracy_loss + 1e-9:
        lost += 1
    return lost / 10 - spent


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
        if isinstance(stage, EarlyExit):
            assert stage.baseline == "original"  # the budget bounds E against the original
            model.spent += _exit_loss(stage, float(model.spent))
        else:
            model.spent += _stage_loss(stage)
        accuracy = BASELINE - float(model.spent) - (HANDICAP if short else 0.0)
        strength = getattr(stage, "ratio", 0) + (16 - getattr(stage, "w_bits", 8) - getattr(stage, "a_bits", 8))
        return StageResult(stage.letter, model, accuracy, 0.01, macs=1.0, params=1, bitops=1.0,
                           bitops_cr=1.0 + strength, cr=1.0, info={"calibration_accuracy": accuracy},
                           correct=torch.ones(8, dtype=torch.bool), calibration_correct=_calibration(accuracy))


def _calibration(accuracy: float) -> torch.Tensor:
    """Per calibration input of a fake run: the first (loss in pp x 10) inputs are the ones it lost."""
    correct = torch.ones(CALIBRATION, dtype=torch.bool)
    correct[: round((BASELINE - accuracy) * CALIBRATION / 100)] = False
    return correct


def _margin(lost: int, confidence: float = 0.95) -> float:
    """By hand: the margin (pp) of a run that lost ``lost`` of the calibration inputs and won none."""
    n, z = CALIBRATION, statistics.NormalDist().inv_cdf(confidence)
    return 100 * z * math.sqrt(lost * (n - lost) / (n * (n - 1))) / math.sqrt(n)


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


def _decisions(controller, order, context):
    """The budget decision of every stage of ``order``."""
    return [d for *_, d in _run(controller, order, context)[0]]


def _controller(target, store=None, runner=None, meter=None, shared=None, **budget):
    """A controller of ``runner`` (fresh fake runs by default); at confidence 0.5 unless told (the
    point estimate: no margins), with equal shares unless told (the hand numbers below)."""
    budget.setdefault("confidence", 0.5)
    budget.setdefault("shares", {"D": 1.0, "P": 1.0, "Q": 1.0, "E": 1.0})
    return Controller(BudgetConfig(**budget), target, BASELINE, torch.ones(CALIBRATION, dtype=torch.bool),
                      seed=lambda step, salt: None, store=store, original=_Net(), runner=runner or _FakeRuns(),
                      meter=meter, shared=shared)


def test_the_margin_is_the_one_sided_paired_bound_computed_by_hand():
    original = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    model = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)
    # d = original - model = [0, 1, 0, -1, 1]: mean 0.2, unbiased variance 2.8 / 4 = 0.7.
    loss, margin = ordercomp.stats.paired_loss_bound(original, model, 0.95)
    assert loss == pytest.approx(20.0)
    assert margin == pytest.approx(100 * 1.6448536 * math.sqrt(0.7) / math.sqrt(5))
    assert margin == pytest.approx(61.5448, abs=1e-3)
    assert ordercomp.stats.paired_loss_bound(original, model, 0.5) == (pytest.approx(20.0), 0.0)
    assert ordercomp.stats.paired_loss_bound(original, model, 0.99)[1] == pytest.approx(margin * 2.3263479 / 1.6448536)
    with pytest.raises(DataError, match="same inputs"):
        ordercomp.stats.paired_loss_bound(original, model[:4], 0.95)
    with pytest.raises(ConfigError, match=r"confidence must be a number in \[0.5, 1\)"):
        ordercomp.stats.paired_loss_bound(original, model, 1.0)
    # The same margin from the share of changed answers (3 of 5) and the loss (20 pp) alone, as the
    # budget estimates the margin of a run it did not make.
    assert ordercomp.stats.loss_margin(0.6, 20.0, 5, 0.95) == pytest.approx(margin)
    assert ordercomp.stats.loss_margin(0.6, 20.0, 5, 0.5) == 0.0
    assert ordercomp.stats.loss_margin(0.0, 0.1, 1000, 0.95) == pytest.approx(_margin(1))  # at least the loss


def test_search_picks_the_strongest_strengths_within_each_share_of_the_budget(context):
    runs = _FakeRuns()
    assert BudgetConfig().shares == {"D": 1.0, "P": 1.0, "Q": 1.5, "E": 0.5}  # the default, used here
    controller = _controller(2.0, runner=runs, shares=BudgetConfig().shares)
    out, plan = _run(controller, "PQE", context)
    decisions = [d for *_, d in out]
    # P may use 1 / (1 + 1.5 + 0.5) of 2 pp: ratio 0.5 costs 0.5 pp, 0.6 would cost 0.9.
    assert decisions[0]["allowance"] == pytest.approx(2 / 3)
    assert decisions[0]["strength"] == {"ratio": 0.5} and decisions[0]["loss"] == pytest.approx(0.5)
    # Q may spend 1.5 / (1.5 + 0.5) of what is left: 0.5 + 0.75 * 1.5 = 1.625. 3-bit weights cost 0.75
    # (1.25 in all), 2-bit 0.9 (1.4), and 6-bit activations 0.4 more (1.8, over).
    assert decisions[1]["allowance"] == pytest.approx(1.625) and decisions[1]["margin_weight"] == pytest.approx(0.75)
    assert decisions[1]["strength"] == {"w_bits": 2, "a_bits": 8} and decisions[1]["within"]
    # E gets the rest of the budget, against the original's calibration accuracy.
    assert decisions[2]["allowance"] == pytest.approx(2.0)
    assert runs.e_settings[0].max_accuracy_loss == pytest.approx(2.0) and runs.e_settings[0].baseline == "original"
    assert decisions[2]["loss"] == pytest.approx(2.0)  # at confidence 0.5 no margin: E spends all that is left
    assert plan[1].w_bits == 2 and plan[0].ratio == 0.5
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
    # Anchors (P, Q, E), the probes, and one more full run: Q at 2 bits.
    fulls = [(e["stage"], e["strength"]) for e in controller.entries if e["kind"] == "full" and not e["anchor"]]
    assert fulls == [("Q", {"w_bits": 2, "a_bits": 8})]
    assert len(runs.calls) == len(controller.entries) == 3 + len(probes) + 1


def test_a_budget_that_cannot_be_met_keeps_the_least_lossy_strengths_and_says_so(context):
    controller = _controller(0.0, confidence=0.95)
    out, _ = _run(controller, "PQ", context)
    decisions = [d for *_, d in out]
    assert decisions[0]["strength"] == {"ratio": 0.2}  # the weakest: 0.1 pp, no ratio costs less
    assert decisions[1]["strength"] == {"w_bits": 8, "a_bits": 8}
    assert not any(d["within"] for d in decisions)
    report = {"order": "PQ", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [], "budget": dict(controller.summary(decisions), done=True)}
    budget = report["budget"]
    assert budget["met"] is False and budget["calibration_loss"] == pytest.approx(0.1)
    # One calibration input of 1 000 lost: a margin of 100 * z * sqrt(1 / 1000) / sqrt(1000) = 0.164 pp.
    assert budget["calibration_margin"] == pytest.approx(_margin(1)) == pytest.approx(0.16449, abs=1e-5)
    assert budget["calibration_upper"] == pytest.approx(0.1 + _margin(1)) and budget["confidence"] == 0.95
    assert ("BUDGET NOT MET: calibration loss +0.10 pp + margin 0.16 = +0.26 pp at 95 % confidence > 0 pp"
            in format_table(report))
    assert "| 1 | P | probe | ratio=0.2 |" in markdown(report)


def test_max_probes_and_time_budget_bound_the_search(context):
    controller = _controller(2.0, max_probes=2)
    out, _ = _run(controller, "PQ", context)
    assert sum(not e["anchor"] for e in controller.entries) == 2
    assert controller.stopped == "max_probes (2) reached"
    assert [d["strength"] for *_, d in out] == [{"ratio": 0.5}, {"w_bits": 4, "a_bits": 8}]  # as configured
    controller = _controller(2.0, time_budget=0)
    _run(controller, "PQ", context)
    assert all(e["anchor"] for e in controller.entries) and "time_budget" in controller.stopped


def test_a_killed_budgeted_run_resumes_without_repeating_finished_probes(context, tmp_path):
    store = ProbeStore(tmp_path / "probes", [1, 8, 8])
    with pytest.raises(RuntimeError, match="killed"):
        _run(_controller(2.0, store=store, runner=_FakeRuns(fail_after=6)), "PQ", context)
    assert len(store.entries()) == 6 and (tmp_path / "probes" / "0-full-ratio0.5.pt").is_file()
    runs = _FakeRuns()
    resumed = _controller(2.0, store=store, runner=runs)
    out, _ = _run(resumed, "PQ", context)
    assert len(runs.calls) == len(resumed.entries) - 6  # none of the 6 finished runs again
    fresh_runs = _FakeRuns()
    fresh = _controller(2.0, runner=fresh_runs)
    fresh_out, _ = _run(fresh, "PQ", context)
    assert [d for *_, d in out] == [d for *_, d in fresh_out]
    keep = ("key", "strength", "calibration_accuracy", "loss", "margin", "calibration_correct")
    assert [{k: e[k] for k in keep} for e in resumed.entries] == [{k: e[k] for k in keep} for e in fresh.entries]
    assert float(out[0][2].spent) == pytest.approx(0.9)  # P at 0.6 fits its 1 pp
    # A finished full run comes back from its result file: the model, its measurements, its per-input results.
    anchor = next(e for e in store.entries() if e["key"] == "0-full-ratio0.5")
    result, lineage = store.load_full(anchor, _Net(), None, context)
    assert float(result.model.spent) == pytest.approx(0.5) and result.accuracy == pytest.approx(BASELINE - 0.5)
    assert result.correct.dtype == torch.bool and result.correct.all() and lineage.base["class"].endswith("_Net")
    assert torch.equal(result.calibration_correct, _calibration(BASELINE - 0.5))
    # A tampered probes.json is refused in one line naming the file, before anything trusts it.
    index = tmp_path / "probes" / "probes.json"
    good = json.loads(index.read_text())
    tampered = {
        "truncated": index.read_text()[:40],
        "not a list": json.dumps({"runs": good}),
        "missing key": json.dumps([{k: v for k, v in good[0].items() if k != "strength"}] + good[1:]),
        "wrong type": json.dumps([dict(good[0], loss="1.0")] + good[1:]),
        "escaping key": json.dumps([dict(e, key="../../elsewhere") if e["kind"] == "full" else e for e in good]),
        "bad per-input results": json.dumps([dict(good[0], calibration_correct="zz:1")] + good[1:]),
    }
    for what, text in tampered.items():
        index.write_text(text)
        with pytest.raises(BadFileError, match=r"probes\.json.*--overwrite") as caught:
            store.entries()
        assert len(str(caught.value).splitlines()) == 1, what


def _seeded_run(controller, order, context):
    """:func:`_run` from the same start model each time (the shared runs are keyed by its weights)."""
    torch.manual_seed(0)
    return _run(controller, order, context)


def test_budgets_sharing_a_probe_directory_make_each_run_once_and_choose_as_alone(context, tmp_path):
    def shared(base="same settings and data"):
        return SharedProbes(tmp_path / "shared", {"settings": base}, [1, 8, 8])

    keep = ("key", "strength", "calibration_accuracy", "loss", "margin", "bitops_cr", "calibration_correct")
    _seeded_run(_controller(2.0, store=ProbeStore(tmp_path / "first", [1, 8, 8]), shared=shared()), "PQE", context)
    for confidence in (0.5, 0.95):  # a margin is recomputed at the budget's own confidence
        runs, alone_runs = _FakeRuns(), _FakeRuns()
        store = ProbeStore(tmp_path / f"second{confidence}", [1, 8, 8])
        second = _controller(1.0, store=store, runner=runs, shared=shared(), confidence=confidence)
        out, plan = _seeded_run(second, "PQE", context)
        alone = _controller(1.0, runner=alone_runs, confidence=confidence)
        alone_out, alone_plan = _seeded_run(alone, "PQE", context)
        assert [d for *_, d in out] == [d for *_, d in alone_out] and plan == alone_plan
        assert [{k: e[k] for k in keep} for e in second.entries] == [{k: e[k] for k in keep} for e in alone.entries]
        assert float(out[-1][2].spent) == float(alone_out[-1][2].spent)
        read_back = [e for e in second.entries if e.get("shared")]
        # P's anchor and its probes from the same start were made by the 2 pp run; E's anchor never
        # is (its threshold is bounded by each budget's own allowance); every other run was made here.
        assert {"0-full-ratio0.5", "0-probe-ratio0.5"} <= {e["key"] for e in read_back}
        assert not any(e["stage"] == "E" for e in read_back)
        assert len(runs.calls) == len(alone_runs.calls) - len(read_back)
        # The run directory holds what was read back, models included: it resumes without the shared one.
        assert [e["key"] for e in store.entries()] == [e["key"] for e in second.entries]
        assert (tmp_path / f"second{confidence}" / "0-full-ratio0.5.pt").is_file()
    same = sorted((tmp_path / "shared").glob("*.json"))
    # Other settings or data: nothing in common.
    runs = _FakeRuns()
    _seeded_run(_controller(1.0, runner=runs, shared=shared("other data")), "PQE", context)
    assert len(runs.calls) == len(alone_runs.calls)
    # A tampered shared file is refused in one line naming it; one whose model is gone is run again.
    entry = next(p for p in same
                 if json.loads(p.read_text())["key"] == "0-full-ratio0.5")  # P's anchor, which every budget needs
    good = entry.read_text()
    entry.write_text(json.dumps(dict(json.loads(good), loss="1.0")))
    with pytest.raises(BadFileError, match=rf"{entry.name}.*delete it") as caught:
        _seeded_run(_controller(1.0, shared=shared()), "PQE", context)
    assert len(str(caught.value).splitlines()) == 1
    entry.write_text(good)
    entry.with_suffix(".pt").unlink()
    runs = _FakeRuns()
    _seeded_run(_controller(1.0, runner=runs, shared=shared()), "PQE", context)
    assert 0 < len(runs.calls) < len(alone_runs.calls) and entry.with_suffix(".pt").is_file()


def test_a_stage_whose_point_estimate_fits_but_whose_interval_does_not_is_refused(context):
    # P alone under 0.6 pp. As configured (ratio 0.5) it loses 0.5 pp: 5 of the 1 000 calibration
    # inputs, a 95 % margin of 100 * z * sqrt(5 * 995 / (1000 * 999)) / sqrt(1000) = 0.367 pp.
    assert _margin(5) == pytest.approx(0.36706, abs=1e-5)
    [point] = _decisions(_controller(0.6, max_probes=0), "P", context)
    assert point["strength"] == {"ratio": 0.5} and point["within"] and point["margin"] == 0.0
    [strict] = _decisions(_controller(0.6, max_probes=0, confidence=0.95), "P", context)
    assert strict["loss"] == pytest.approx(0.5) and strict["margin"] == pytest.approx(_margin(5))
    assert strict["upper"] == pytest.approx(0.5 + _margin(5)) and not strict["within"]  # 0.867 > 0.6
    # Searching, the interval refuses ratio 0.5 (its probe: 0.5 estimated, 12 inputs lost with the
    # short training's 0.7, margin 0.567) and keeps 0.4: 0.1 pp + 0.164 fits; the point estimate keeps 0.5.
    controller = _controller(0.6, confidence=0.95)
    [searched] = _decisions(controller, "P", context)
    probe = next(e for e in controller.entries if e["key"] == "0-probe-ratio0.5")
    assert probe["estimated_loss"] == pytest.approx(0.5) and probe["margin"] == pytest.approx(_margin(12))
    assert searched["strength"] == {"ratio": 0.4} and searched["within"]
    assert searched["upper"] == pytest.approx(0.1 + _margin(1))
    [point] = _decisions(_controller(0.6), "P", context)
    assert point["strength"] == {"ratio": 0.5} and point["within"]


class _UnluckyAnchorProbe(_FakeRuns):
    """The short probe of Q as configured (4w8a) comes out ``extra`` pp worse than its training
    says, as a short run can: every other level's estimate is ``extra`` too hopeful."""

    def __init__(self, extra, **kw):
        super().__init__(**kw)
        self.extra = extra

    def __call__(self, stage, model, context, exit_settings=None, lineage=None):
        if context.train.epochs == 1 and isinstance(stage, Quantize) and (stage.w_bits, stage.a_bits) == (4, 8):
            model.spent += self.extra
        return super().__call__(stage, model, context, exit_settings, lineage)


def test_a_refused_choice_steps_back_to_the_next_strongest_probe_within_before_the_anchor(context):
    # Q alone under 0.8 pp. As configured, 4w8a loses 0.6 (BitOpsCR 5 in the fake runs); its probe,
    # 0.3 pp unlucky (1.6 = 0.6 + 0.7 short training + 0.3), makes 2w8a (probed 1.6) look 0.6 pp:
    # chosen, it loses 0.9 fully trained and is refused. The next strongest probe that looked
    # within is 3w8a (probed 1.45: 0.6 + 1.45 - 1.6 = 0.45 pp, BitOpsCR 6): trained fully it loses
    # 0.75, fits, and is kept, where the anchor used to stay.
    controller = _controller(0.8, runner=_UnluckyAnchorProbe(0.3))
    [decision] = _decisions(controller, "Q", context)
    probe = next(e for e in controller.entries if e["key"] == "0-probe-a_bits8-w_bits3")
    assert probe["estimated_loss"] == pytest.approx(0.45) and probe["bitops_cr"] == 6
    assert decision["rejected"] == [{"w_bits": 2, "a_bits": 8}] and "fell_back" not in decision
    assert decision["strength"] == {"w_bits": 3, "a_bits": 8} and decision["loss"] == pytest.approx(0.75)
    assert decision["within"]
    fulls = [e["strength"] for e in controller.entries if e["kind"] == "full"]
    assert fulls == [{"w_bits": 4, "a_bits": 8}, {"w_bits": 2, "a_bits": 8}, {"w_bits": 3, "a_bits": 8}]
    report = {"order": "Q", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [], "budget": dict(controller.summary([decision]), done=True)}
    assert "Q w_bits=3, a_bits=8 (+0.75 + 0.00 of 0.80 pp; refused: w_bits=2, a_bits=8)" in format_table(report)
    # Without step backs the anchor stays.
    [alone] = _decisions(_controller(0.8, runner=_UnluckyAnchorProbe(0.3), step_backs=0), "Q", context)
    assert alone["strength"] == {"w_bits": 4, "a_bits": 8} and alone["rejected"] == [{"w_bits": 2, "a_bits": 8}]
    # At most step_backs (2) of them: 1 pp unlucky, 2w4a is chosen and refused (1.7 pp), then 2w6a
    # (1.3) and 2w8a (0.9), the two strongest probes estimated within; 3w8a (0.75, within) is not
    # tried, and the anchor stays. With a third step back it is, and kept.
    [bounded] = _decisions(_controller(0.8, runner=_UnluckyAnchorProbe(1.0)), "Q", context)
    assert bounded["rejected"] == [{"w_bits": 2, "a_bits": a} for a in (4, 6, 8)]
    assert bounded["strength"] == {"w_bits": 4, "a_bits": 8}
    [third] = _decisions(_controller(0.8, runner=_UnluckyAnchorProbe(1.0), step_backs=3), "Q", context)
    assert third["strength"] == {"w_bits": 3, "a_bits": 8} and third["loss"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="budget.step_backs"):
        BudgetConfig(step_backs=-1)


def test_a_stage_misled_by_its_probes_over_the_whole_budget_falls_back_to_weaker_levels(context):
    # Q alone under 0.2 pp (its part is the whole budget). As configured (4w8a) it loses 0.6; its probe, 1 pp unlucky, makes every
    # other level look 1 pp better than it is: 3w6a is chosen (1.15 pp fully trained) and refused; so
    # is the step back to 3w8a (0.75 pp; the next strongest probe that looked within, -0.25 pp
    # estimated; 6w8a, estimated within too, buys less than the anchor and is no step back).
    controller = _controller(0.2, runner=_UnluckyAnchorProbe(1.0))
    [decision] = _decisions(controller, "Q", context)
    assert decision["rejected"] == [{"w_bits": 3, "a_bits": 6}, {"w_bits": 3, "a_bits": 8}]
    # Then one level weaker than any run so far, fully trained: 6w8a (0.3 pp, still over), 8w8a (0 pp, fits).
    assert decision["fell_back"] == [{"w_bits": 6, "a_bits": 8}, {"w_bits": 8, "a_bits": 8}]
    assert decision["strength"] == {"w_bits": 8, "a_bits": 8} and decision["within"] and decision["loss"] == 0.0
    fulls = [e["strength"] for e in controller.entries if e["kind"] == "full"]
    assert fulls == [{"w_bits": 4, "a_bits": 8}, {"w_bits": 3, "a_bits": 6}, {"w_bits": 3, "a_bits": 8},
                     {"w_bits": 6, "a_bits": 8}, {"w_bits": 8, "a_bits": 8}]
    report = {"order": "Q", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [], "budget": dict(controller.summary([decision]), done=True)}
    assert "fell back: w_bits=6, a_bits=8; w_bits=8, a_bits=8 trained fully" in format_table(report)
    # Over its part but within the whole budget, a stage only leaves less to the later ones: with E
    # after it under 1 pp, Q's part is 0.5 pp; 4w8a (0.6 pp) stays, and E spends the rest.
    q, e = _decisions(_controller(1.0, runner=_UnluckyAnchorProbe(1.0), step_backs=0), "QE", context)
    assert q["strength"] == {"w_bits": 4, "a_bits": 8} and q["rejected"] == [{"w_bits": 3, "a_bits": 6}]
    assert "fell_back" not in q and not q["within"] and e["within"] and e["loss"] == pytest.approx(1.0)
    # The probing bound holds: with one run fewer, 6w8a (the least lossy, though over) is kept, 8w8a not run.
    controller = _controller(0.2, runner=_UnluckyAnchorProbe(1.0), max_probes=7, step_backs=0)
    [decision] = _decisions(controller, "Q", context)
    assert decision["strength"] == {"w_bits": 6, "a_bits": 8} and not decision["within"]
    assert decision["not_run"] == {"w_bits": 8, "a_bits": 8} and controller.stopped == "max_probes (7) reached"
    # Probes that do not mislead: the search itself finds 8w8a, nothing falls back.
    [decision] = _decisions(_controller(0.2), "Q", context)
    assert decision["strength"] == {"w_bits": 8, "a_bits": 8} and "fell_back" not in decision


def test_the_margin_is_counted_once_each_stage_spends_its_share_of_what_it_leaves(context):
    runs = _FakeRuns()
    controller = _controller(2.0, confidence=0.95, runner=runs)
    out, plan = _run(controller, "PQE", context)
    decisions = [d for *_, d in out]
    # P: a third of 2 pp, with a third of its own margin. As configured (ratio 0.5) it loses 0.5 pp,
    # margin 0.367: 0.5 + 0.367 / 3 = 0.622 <= 2 / 3, so it stays (0.5 + 0.367 would not have fit);
    # ratio 0.6 loses 0.9 pp, over the allowance with no margin at all.
    assert decisions[0]["allowance"] == pytest.approx(2 / 3) and decisions[0]["margin_weight"] == pytest.approx(1 / 3)
    assert decisions[0]["strength"] == {"ratio": 0.5} and decisions[0]["margin"] == pytest.approx(_margin(5))
    assert decisions[0]["within"] and decisions[0]["upper"] == pytest.approx(0.5 + _margin(5))
    # Q: half of what the point loss 0.5 leaves, 0.5 + 1.5 / 2 = 1.25, with half its margin. 6-bit
    # weights: 0.8 pp, margin 0.464, 0.8 + 0.232 = 1.032 fits; 4-bit: 1.1 + 0.543 / 2 = 1.371 does not.
    assert decisions[1]["allowance"] == pytest.approx(1.25) and decisions[1]["margin_weight"] == pytest.approx(0.5)
    assert decisions[1]["incoming_margin"] == pytest.approx(_margin(5))
    assert decisions[1]["strength"] == {"w_bits": 6, "a_bits": 8} and decisions[1]["loss"] == pytest.approx(0.8)
    assert decisions[1]["margin"] == pytest.approx(_margin(8)) == pytest.approx(0.4636, abs=1e-4)
    # E, last: all of the budget with all of its margin, paired against the original. 1.3 pp has the
    # margin 0.590 (1.890 <= 2); 1.4 pp would have 0.612 (2.012 > 2).
    assert decisions[2]["allowance"] == pytest.approx(2.0) and decisions[2]["margin_weight"] == 1
    exit_stage = runs.e_settings[0]
    assert exit_stage.max_accuracy_loss == pytest.approx(2.0) and exit_stage.confidence == 0.95
    assert exit_stage.baseline == "original" and plan[2] == exit_stage
    assert decisions[2]["loss"] == pytest.approx(1.3) and decisions[2]["upper"] == pytest.approx(1.3 + _margin(13))
    assert 1.3 + _margin(13) <= 2.0 < 1.4 + _margin(14)
    # A probe's margin is estimated as its loss is: its short run (0.7 pp more lost) changed 15 answers,
    # the anchor's probe 18 and the anchor 11, so the full run would change 11 + 15 - 18 = 8.
    probe = next(e for e in controller.entries if e["key"] == "1-probe-a_bits8-w_bits6")
    assert probe["margin"] == pytest.approx(_margin(15)) and probe["estimated_margin"] == pytest.approx(_margin(8))
    for d in decisions:
        assert d["upper"] == pytest.approx(d["loss"] + d["margin"])
        assert d["within"] == (d["loss"] + d["margin_weight"] * d["margin"] <= d["allowance"] + 1e-9)


def test_the_smallest_share_is_the_smallest_planned_part_the_last_stage_aside():
    # DPQE at 1 pp with the default shares 1, 1, 1.5, 0.5: parts 0.25, 0.25, 0.375 and 0.125 pp.
    # E takes what the others leave (its bound is the whole budget's), so S = 0.25 pp, as with
    # equal shares; a plan of one stage has the whole budget.
    plan = [Distill(), Prune(), Quantize(), EarlyExit()]
    assert smallest_part(1.0, [1.0, 1.0, 1.5, 0.5]) == pytest.approx(0.25)
    assert smallest_part(1.0, [1.0, 1.0, 1.0]) == pytest.approx(1 / 3)
    assert smallest_part(2.0, [0.5]) == 2.0 and smallest_part(1.0, []) == 0.0
    controller = Controller(BudgetConfig(), 1.0, BASELINE, torch.ones(CALIBRATION, dtype=torch.bool),
                            seed=lambda step, salt: None, original=_Net(), runner=_FakeRuns())
    assert controller.check_resolution(plan, 100, warn=False)["smallest_share"] == pytest.approx(0.25)
    # P, Q and E with the shares 1, 1, 0.5: parts 0.4, 0.4 and 0.2 pp; E's aside, S = 0.4.
    controller.config.shares = {"P": 1.0, "Q": 1.0, "E": 0.5}
    assert controller.check_resolution(plan[1:], 100, warn=False)["smallest_share"] == pytest.approx(0.4)


def test_a_calibration_split_too_small_for_the_budget_is_said_before_training(caplog):
    plan = [Prune(), Quantize(), EarlyExit()]
    controller = _controller(1.0, confidence=0.95)
    # The smallest share: 1/3 pp (q = 1/300). 100 inputs: margin 100 * z * sqrt(q (1 - q) / 100) = 0.948 pp.
    # Needed: the smallest n with margin <= 1/3, n >= z^2 (1 - q) * 100 / (1/3) = 808.96.
    with caplog.at_level(logging.WARNING, logger="ordercomp.budget"):
        found = controller.check_resolution(plan, 100, carved=(900, 100))
    assert found["needed"] == 809 == math.ceil(Z95 ** 2 * (1 - 1 / 300) * 300)
    q = 1 / 300
    assert 100 * Z95 * math.sqrt(q * (1 - q) / 809) <= 1 / 3 < 100 * Z95 * math.sqrt(q * (1 - q) / 808)
    assert found["margin"] == pytest.approx(0.94803, abs=1e-4) and found["smallest_share"] == pytest.approx(1 / 3)
    assert found["calibration_fraction"] == 0.81  # 809 of the 1 000 samples, rounded up
    assert [r.getMessage() for r in caplog.records] == [found["message"]]
    assert ("calibration split of 100 inputs cannot resolve shares of 0.333 pp at confidence 0.95"
            in found["message"] and "about 809 calibration inputs" in found["message"])
    assert "calibration_fraction 0.81" in found["message"]
    assert controller.summary([])["resolution"] == found
    assert "would not suffice" in controller.check_resolution(plan, 100, carved=(400, 100))["message"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ordercomp.budget"):
        assert controller.check_resolution(plan, 10_000) is None
        assert _controller(1.0).check_resolution(plan, 100) is None  # confidence 0.5: no margin to resolve
    assert not caplog.records and controller.summary([])["resolution"] is None


def test_a_first_model_whose_margin_alone_exceeds_a_share_is_said_with_the_calibration_size_that_would_do(
        context, caplog):
    # P, Q, E under 1 pp at 95 %: the smallest share is 1/3 pp. P as configured (ratio 0.5) loses
    # 5 of the 1 000 calibration inputs, a margin of 0.367 pp (> 1/3): that margin shrinks with
    # sqrt(n), so 1 000 * (0.367 / (1/3))^2 = 1 212.4 -> 1 213 inputs bring it to 1/3 pp.
    controller = _controller(1.0, confidence=0.95)
    controller.check_resolution([Prune(), Quantize(), EarlyExit()], CALIBRATION, carved=(9000, 1000))
    with caplog.at_level(logging.WARNING, logger="ordercomp.budget"):
        _decisions(controller, "PQE", context)
    floor = controller.summary([])["margin_floor"]
    assert floor["margin"] == pytest.approx(_margin(5)) and floor["changed"] == pytest.approx(0.005)
    assert floor["smallest_share"] == pytest.approx(1 / 3)
    assert floor["needed"] == 1213 == math.ceil(CALIBRATION * (_margin(5) * 3) ** 2)
    assert floor["calibration_fraction"] == 0.13  # 1 213 of the 10 000 samples, rounded up
    assert "answers 0.5 % of the 1000 calibration inputs differently" in floor["message"]
    assert "its margin alone is 0.37 pp at confidence 0.95" in floor["message"]
    assert "about 1213 calibration inputs" in floor["message"]
    assert [r.getMessage() for r in caplog.records] == [floor["message"]]
    report = {"order": "PQE", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [], "budget": dict(controller.summary([]), done=True)}
    assert f"calibration data limits the budget: {floor['message']}" in format_table(report)
    # Under 2 pp (shares of 2/3 pp), or at the point estimate (no margin), nothing is said.
    for quiet in (_controller(2.0, confidence=0.95), _controller(1.0)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ordercomp.budget"):
            _decisions(quiet, "PQE", context)
        assert quiet.summary([])["margin_floor"] is None and not caplog.records


def test_budget_settings_are_checked():
    for bad in (1.0, 0.4, "high"):
        with pytest.raises(ConfigError, match=r"budget.confidence must be a number in \[0.5, 1\)"):
            BudgetConfig(confidence=bad)
    with pytest.raises(ConfigError, match="budget.confidence"):
        CompressConfig.from_dict({"budget": {"confidence": 0.3}})
    assert CompressConfig().override(["budget.confidence=0.9"]).budget.confidence == 0.9
    with pytest.raises(ConfigError, match=r"ladders\['ratio'\]\[1\]: ratio must be a number in \(0, 1\)"):
        Prune(ladders={"ratio": (0.2, 1.5)})
    with pytest.raises(ConfigError, match=r"ladders\['w_bits'\]\[1\]: w_bits"):
        Quantize(ladders={"w_bits": (4, 9)})
    with pytest.raises(ConfigError, match=r"'prune': ladders\['ratio'\]\[1\]"):
        CompressConfig().override(["prune.ladders={ratio: [0.2, 1.5]}"])
    with pytest.raises(ConfigError, match="budget.max_probes"):
        BudgetConfig(max_probes=-1)
    with pytest.raises(ConfigError, match="must not repeat"):
        Distill(ladders={"width": (1.0, 1.0)})
    with pytest.raises(ConfigError, match=r"ladders has the key 'width'; Prune's strength settings are \['ratio', 'round_up_to'\]"):
        Prune(ladders={"width": (0.5,)})
    with pytest.raises(ConfigError, match="budget.shares"):
        CompressConfig.from_dict({"budget": {"shares": {"P": 0}}})
    assert CompressConfig().override(["budget.max_probes=4"]).budget.max_probes == 4


# --- real runs ---------------------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    return subprocess.run([sys.executable, "-m", "ordercomp", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


@pytest.mark.slow
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
    assert budget["calibration_loss"] == pytest.approx(loss) and budget["done"] and budget["confidence"] == 0.95
    assert budget["calibration_upper"] == pytest.approx(loss + budget["calibration_margin"])
    assert budget["calibration_margin"] > 0 and budget["met"] == (budget["calibration_upper"] <= 3 + 1e-9)
    assert ("budget met" if budget["met"] else "BUDGET NOT MET") in proc.stdout
    for d, stage in zip(budget["decisions"], report["stages"]):
        assert d["loss"] == pytest.approx(budget["baseline"] - stage["calibration_accuracy"])
    # The margins are paired over the calibration inputs; their packed results stay out of the report.
    assert all("margin" in p and "calibration_correct" not in p for p in budget["probes"])
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
    refused = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--probe-cache",
                   tmp_path / "shared", "--out", tmp_path / "other")
    assert refused.returncode == 2 and "--probe-cache belong to the accuracy budget and need --target-loss" in refused.stderr


@pytest.mark.slow
def test_compress_resumes_a_budgeted_run_without_repeating_its_probes(tmp_path):
    # Real loaders, shuffled and augmented, shared by every run in this process: each run and probe
    # restarts their random streams, so a resumed run repeats an uninterrupted one.
    bundle = ordercomp.data.load("npz", MNIST_DATA, limit=256, batch_size=64, calibration_fraction=0.25)
    train, val = bundle.train_loader, bundle.val_loader
    torch.manual_seed(0)
    model = ordercomp.models.create("resnet8", num_classes=10, in_channels=1)
    config = config_of("PQ", {"quantize": {"ladders": {"w_bits": [8, 4, 2], "a_bits": [8, 4]}}}, epochs=1,
                       max_batches=2, target_loss=5.0, progress=False)
    calls = []

    def counted(*args, **kw):
        if len(calls) == kill_after:
            raise KeyboardInterrupt("killed")
        calls.append(args[0].letter)
        return ordercomp.pipeline.run_stage(*args, **kw)

    def run_in(out, **kw):  # compress(), its stages run through ``counted``
        with ordercomp.pipeline.Run.open(model, train, val, config, calibration_loader=bundle.calibration_loader,
                                         out=out, runner=counted, **kw) as run:
            return run.compress(model)

    kill_after = None
    fresh = run_in(tmp_path / "fresh").report
    runs = fresh["budget"]["probes"]
    # 255 calibration inputs resolve 2.5 pp shares at 95 % (z^2 * 0.975 * 100 / 2.5 = 105.5 would do).
    assert fresh["data"]["calibration_inputs"] == 255 and fresh["budget"]["resolution"] is None
    keep = ("key", "calibration_accuracy", "margin", "bitops_cr")
    calls.clear()  # a run that clears the directory (overwrite) starts its probes afresh
    again = run_in(tmp_path / "fresh", overwrite=True).report["budget"]["probes"]
    assert len(calls) == len(runs) and [{k: e[k] for k in keep} for e in again] == [{k: e[k] for k in keep} for e in runs]
    # Killed in P's search, then in Q's (P finished and saved): the resumed run repeats no finished run.
    for kill_after in (3, sum(p["stage"] == "P" for p in runs) + 2):
        out = tmp_path / f"killed{kill_after}"
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_in(out)
        calls.clear()
        kill_after, killed_at = None, kill_after
        resumed = run_in(out, resume=True).report
        assert len(calls) == len(runs) - killed_at
        assert [{k: e[k] for k in keep} for e in resumed["budget"]["probes"]] == [{k: e[k] for k in keep} for e in runs]
        chosen = [[d["strength"] for d in r["budget"]["decisions"]] for r in (resumed, fresh)]
        assert chosen[0] == chosen[1]
        assert resumed["stages"][-1]["calibration_accuracy"] == fresh["stages"][-1]["calibration_accuracy"]


@pytest.mark.slow
def test_compress_under_two_budgets_shares_their_common_runs_and_chooses_as_alone(tmp_path):
    # Real loaders, shuffled and augmented: each run restarts their random streams from its key,
    # so a run read back from the shared directory is the run this budget would have made.
    bundle = ordercomp.data.load("npz", MNIST_DATA, limit=256, batch_size=64, calibration_fraction=0.25)
    torch.manual_seed(0)
    model = ordercomp.models.create("resnet8", num_classes=10, in_channels=1)
    calls = []

    def counted(*args, **kw):
        calls.append(args[0].letter)
        return ordercomp.pipeline.run_stage(*args, **kw)

    def run_in(out, target, **kw):
        config = config_of("PQ", {"quantize": {"ladders": {"w_bits": [8, 4, 2], "a_bits": [8, 4]}}}, epochs=1,
                           max_batches=2, target_loss=target, progress=False)
        calls.clear()
        with ordercomp.pipeline.Run.open(model, bundle.train_loader, bundle.val_loader, config, out=out,
                                         calibration_loader=bundle.calibration_loader, runner=counted, **kw) as run:
            return run.compress(model), len(calls)

    run_in(tmp_path / "wide", 8.0, probe_cache=tmp_path / "shared")
    (shared, made), (alone, made_alone) = (run_in(tmp_path / "tight", 4.0, probe_cache=tmp_path / "shared"),
                                           run_in(tmp_path / "alone", 4.0))
    keep = ("key", "calibration_accuracy", "loss", "margin", "bitops_cr")
    probes = [r.report["budget"]["probes"] for r in (shared, alone)]
    assert [{k: e[k] for k in keep} for e in probes[0]] == [{k: e[k] for k in keep} for e in probes[1]]
    assert [d["strength"] for d in shared.report["budget"]["decisions"]] == \
        [d["strength"] for d in alone.report["budget"]["decisions"]]
    read_back = [e["key"] for e in probes[0] if e.get("shared")]
    assert "0-full-ratio0.5" in read_back and made == made_alone - len(read_back)  # P's anchor at least
    a, b = (ordercomp.load(tmp_path / name / "model.pt").state_dict() for name in ("tight", "alone"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert shared.report["stages"][-1]["accuracy"] == alone.report["stages"][-1]["accuracy"]
    # For budgeted runs only, into a directory.
    with pytest.raises(ConfigError, match="probe_cache shares the probes of budgeted runs: it needs config.target_loss"):
        with ordercomp.pipeline.Run.open(model, bundle.train_loader, bundle.val_loader, {"order": "PQ"},
                                         probe_cache=tmp_path / "x"):
            pass
    (tmp_path / "file").write_text("")
    with pytest.raises(ordercomp.errors.RunDirError, match="probe_cache: .*file is a file, not a directory"):
        run_in(None, 4.0, probe_cache=tmp_path / "file")


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
    assert Distill().student_width(context.zoo_spec) == 1.0 and Distill().student_width(None) == 0.5
    with pytest.raises(ConfigError, match="width"):
        Distill(width=0)


def test_the_student_ladder_starts_at_the_teachers_own_architecture():
    widths = (1.0, 0.75, 0.5, 0.375, 0.25)
    on = lambda zoo_spec: type("Ctx", (), {"zoo_spec": zoo_spec})()  # noqa: E731 (the ladders read the teacher's zoo spec only)
    assert Distill().strengths(on(("resnet56", {}))) == {"student": ("resnet56", "resnet20", "resnet8"),
                                                          "width": widths}
    assert list(Distill(student="resnet20").strengths(on(("resnet56", {})))) == ["student", "width"]
    # no shallower member, a student of another family, a given module, a model outside the zoo: width only
    for stage, spec in ((Distill(), ("resnet8", {})), (Distill(student="vgg11"), ("resnet20", {})),
                        (Distill(student=nn.Linear(2, 2)), ("resnet20", {})), (Distill(), None)):
        assert stage.strengths(on(spec)) == {"width": widths}
    assert Distill().strength(on(("resnet20", {}))) == {"student": "resnet8", "width": 1.0}
    assert Distill().strength(on(None)) == {"width": 0.5}  # a thinner copy of a model outside the zoo
    assert Distill(ladders={"student": ("resnet20", "resnet8")}).strengths(on(None))["student"] == ("resnet20", "resnet8")
    assert budget_module.start_index(("resnet20", "resnet8"), "resnet8") == 1
    assert budget_module.start_index((8, 6, 4, 3, 2), 5) == 1 and budget_module.start_index((0.2, 0.4), 0.9) == 1


def test_the_former_budget_ladders_move_to_the_stages():
    """budget.widths / ratios / w_bits / a_bits still load, with a DeprecationWarning, into the
    stages' ladders; a saved config of version 1 (every ladder at its default then) loads silently."""
    with pytest.warns(DeprecationWarning) as caught:
        config = CompressConfig.from_dict({"budget": {"ratios": [0.3, 0.5], "a_bits": [8, 4]}})
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        "budget.a_bits is now quantize.ladders['a_bits']", "budget.ratios is now prune.ladders['ratio']"]
    assert config.prune.strengths() == {"ratio": (0.3, 0.5)} and config.budget.ratios is None
    assert config.quantize.strengths() == {"w_bits": (8, 6, 4, 3, 2), "a_bits": (8, 4)}
    with pytest.warns(DeprecationWarning):
        kept = CompressConfig(budget=BudgetConfig(widths=(1.0, 0.5)))
    assert kept.distill.ladders == {"width": (1.0, 0.5)}
    with pytest.raises(ConfigError, match=r"budget.ratios: ladders\['ratio'\]\[1\]: ratio must be"):
        BudgetConfig(ratios=(0.2, 1.5))
    saved = CompressConfig().to_dict()
    assert saved["version"] == 3 and CompressConfig.from_dict(saved).to_dict() == saved
    old = {k: copy.deepcopy(v) for k, v in saved.items() if k != "version"}
    for section in old.values():
        if isinstance(section, dict):
            section.pop("ladders", None)
    old["budget"].update(widths=[1.0, 0.75, 0.5, 0.375, 0.25], ratios=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                         w_bits=[8, 6, 4, 3, 2], a_bits=[8, 6, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CompressConfig.from_dict(old).to_dict() == saved
    with pytest.raises(ConfigError, match="config version must be 1, 2 or 3"):
        CompressConfig.from_dict({"version": 4})


def test_the_suggested_fraction_counts_a_split_the_data_loader_carved():
    from ordercomp.pipeline.records import carved_sizes

    bundle = ordercomp.data.load("npz", MNIST_DATA, calibration_fraction=0.25)  # as the command line loads
    train, calibration = bundle.train_loader, bundle.calibration_loader
    assert carved_sizes(train, calibration, calibration, 0.25) == (769, 255)  # a quarter of each class
    assert carved_sizes(train, calibration, None, 0.25) == (769, 255)  # carved by the run itself
    assert carved_sizes(train, calibration, None, 0.0) is None
    own = DataLoader(TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))
    assert carved_sizes(train, own, own, 0.25) is None, "a calibration loader of your own: no fraction to suggest"


class _FakeMeter:
    """Speed-ups known in closed form: pruning a ratio r runs 1 / (1 - r) times faster, bits change nothing
    (as int8 kernels run every width of 8 bits and below alike)."""

    def __init__(self):
        self.measured = []

    def speedup(self, model) -> float:
        self.measured.append(model.speed)
        return model.speed


class _TimedRuns(_FakeRuns):
    def __call__(self, stage, model, context, exit_settings=None, lineage=None):
        result = super().__call__(stage, model, context, exit_settings, lineage)
        speed = getattr(model, "speed", 1.0)
        prune = isinstance(stage, Prune)
        result.model.speed = speed * MULTIPLE_SPEED[stage.round_up_to] / (1 - stage.ratio) if prune else speed
        return result


def test_a_latency_budget_takes_the_fastest_strength_not_the_strongest(context):
    """Fewer weight bits save BitOps but no time (int8 kernels run every width of 8 bits and below
    alike): the BitOps budget takes Q's strongest bits within its share, the latency budget the
    weakest probed within it (spending less of the budget); P's ratio buys time, and both take it."""
    by_bitops = _decisions(_controller(2.0, runner=_TimedRuns()), "PQ", context)
    meter = _FakeMeter()
    controller = _controller(2.0, runner=_TimedRuns(), cost="latency", meter=meter)
    decisions = _decisions(controller, "PQ", context)
    assert by_bitops[0]["strength"] == {"ratio": 0.6}
    assert decisions[0]["strength"] == {"ratio": 0.6, "round_up_to": 8}  # a multiple BitOps do not see: below
    assert decisions[0]["speedup"] == pytest.approx(3.25)
    q_probes = [e for e in controller.entries if e["stage"] == "Q" and e["kind"] == "probe"]
    assert all(e["speedup"] == pytest.approx(3.25) for e in q_probes)
    fitting = [e["strength"]["w_bits"] for e in q_probes
               if e["strength"]["a_bits"] == 8 and e["estimated_loss"] <= decisions[1]["allowance"]]
    assert by_bitops[1]["strength"]["w_bits"] == min(fitting) == 2
    assert decisions[1]["strength"]["w_bits"] == max(fitting) > 2 and decisions[1]["within"]
    assert decisions[1]["loss"] < by_bitops[1]["loss"]
    assert len(meter.measured) == len(controller.entries)  # every run measured once
    summary = controller.summary(decisions)
    assert summary["cost"] == "latency"
    report = {"order": "PQ", "original": {"accuracy": BASELINE, "macs": 1, "params": 1, "bitops": 1},
              "stages": [{"step": 1, "stage": "P", "bitops_cr": 3.0}, {"step": 2, "stage": "Q", "bitops_cr": 40.0}],
              "budget": summary}
    lines = ordercomp.report.budget_lines(report)
    assert "costs (the budget bought measured latency): P 3.0x BitOps, 3.25x faster; Q 40.0x BitOps, 3.25x faster" in lines
    assert "BitOps and latency part ways at Q (3.0x -> 40.0x BitOps, 3.25x -> 3.25x speed)" in lines


def test_a_latency_budget_searches_the_channel_multiple_bitops_do_not_see(context):
    """P's channel multiple (``round_up_to``) changes the time, not the BitOps: the latency budget
    searches it after the ratio and takes the fastest multiple within P's share (8: 1.3x for 0.05 pp;
    16 would cost 0.5 pp); the BitOps budget never probes it, nor the latency budget when
    ``round_to`` fixes the multiple."""
    by_bitops = _controller(2.0, runner=_TimedRuns())
    assert _decisions(by_bitops, "PQ", context)[0]["strength"] == {"ratio": 0.6}
    assert all("round_up_to" not in e["strength"] for e in by_bitops.entries)
    controller = _controller(2.0, runner=_TimedRuns(), cost="latency", meter=_FakeMeter())
    out, plan = _run(controller, "PQ", context)
    decision = out[0][3]
    assert decision["searched"] == ["ratio", "round_up_to"]
    assert decision["strength"] == {"ratio": 0.6, "round_up_to": 8} and plan[0].round_up_to == 8
    assert decision["speedup"] == pytest.approx(1.3 / 0.4) and decision["loss"] == pytest.approx(0.95)
    multiples = {e["strength"]["round_up_to"]: e["speedup"] for e in controller.entries
                 if e["stage"] == "P" and e["kind"] == "probe" and e["strength"]["ratio"] == 0.6}
    assert multiples[16] > multiples[8] and 4 in multiples  # 16 is faster but costs more than P's share
    # The ladder is the stage's to set, checked as the setting is; a fixed round_to leaves nothing to search.
    assert Prune(ladders={"round_up_to": [1, 8]}).latency_strengths() == {"round_up_to": (1, 8)}
    assert Prune().strengths() == {"ratio": Prune.LADDERS["ratio"]}
    assert Prune(round_to=8).latency_strengths() == {}
    with pytest.raises(ConfigError, match=r"ladders\['round_up_to'\]\[1\]: round_up_to must be an integer >= 1, got 0"):
        Prune(ladders={"round_up_to": [1, 0]})
    with pytest.raises(ConfigError, match=r"strength settings are \['ratio', 'round_up_to'\]"):
        Prune(ladders={"bits": [1]})
    with pytest.raises(ConfigError, match=r"round_to \(8\) rounds the kept channels down and round_up_to \(4\) up"):
        Prune(round_to=8, round_up_to=4)


def test_the_latency_cost_is_checked_and_needs_a_meter():
    with pytest.raises(ConfigError, match=r"budget.cost must be one of \('bitops', 'latency'\), got 'time'"):
        BudgetConfig(cost="time")
    with pytest.raises(ConfigError, match=r"budget.latency_batch must be an integer >= 1, got 0"):
        BudgetConfig(latency_batch=0)
    with pytest.raises(ConfigError, match="budget.cost 'latency' needs a latency meter"):
        _controller(1.0, cost="latency")
    assert CompressConfig.from_dict({"budget": {"cost": "latency", "latency_batch": 8}}).budget.latency_batch == 8


def test_exits_chosen_by_measured_latency_drop_heads_that_cost_more_than_they_save():
    """Fewer expected BitOps at threshold 0.5, but its heads cost time: by latency, no exit is chosen."""
    correct = torch.ones(100, dtype=torch.bool)
    points = [SweepPoint(0.5, 99.0, 1.0, [0.6, 0.4], correct), SweepPoint(0.9, 99.0, 1.5, [0.3, 0.7], correct),
              SweepPoint(NO_EXIT, 99.0, 2.0, [0.0, 1.0], correct)]
    settings = EarlyExit(max_accuracy_loss=1.0)
    assert threshold_choice(points, settings)["threshold"] == 0.5  # by BitOps
    choice = threshold_choice(points, settings, speedups={0.5: 0.9, 0.9: 0.95, NO_EXIT: 1.0})
    assert choice["threshold"] == NO_EXIT and not choice["pays_off"]
    assert [p["speedup"] for p in choice["sweep"]] == [0.9, 0.95, 1.0]
    # Within 5 % of the fastest the speeds are one, and the more accurate point is taken.
    points[1] = SweepPoint(0.9, 99.5, 1.5, [0.3, 0.7], correct)
    assert threshold_choice(points, settings, speedups={0.5: 0.9, 0.9: 0.97, NO_EXIT: 1.0})["threshold"] == 0.9


def test_a_strength_given_as_a_whole_float_is_the_ladder_s_int_and_is_probed_once():
    """Quantize(policy="auto") starts at bits_per_mac 32.0 and its ladder holds 32: the search probed
    that strength twice, once under each name (41 s of a budgeted run on the digits)."""
    from ordercomp.pipeline.probes import run_key as _key

    assert _key(2, "probe", {"bits_per_mac": 32.0}) == _key(2, "probe", {"bits_per_mac": 32}) == "2-probe-bits_per_mac32"
    assert _key(2, "probe", {"ratio": 0.5, "w": 3}) == "2-probe-ratio0.5-w3"
    assert _key(2, "probe", {"bits_per_mac": 24}) != _key(2, "probe", {"bits_per_mac": 32.0})


def test_plans_that_differ_only_in_a_later_stage_share_the_earlier_stages_runs(context, tmp_path):
    def run(quantize, runs):
        controller = _controller(1.0, runner=runs, shared=SharedProbes(tmp_path / "shared", {"settings": {}}, [1, 8, 8]))
        torch.manual_seed(0)
        model = _Net()
        list(controller.run(model, [Prune(), quantize, EarlyExit()], context, Lineage.of(model)))
        return controller.entries

    first_runs, second_runs = _FakeRuns(), _FakeRuns()
    first = run(Quantize(), first_runs)
    second = run(Quantize(w_bits=6), second_runs)  # Q configured otherwise: its anchor is another run
    p_runs = [e["key"] for e in first if e["stage"] == "P"]
    assert p_runs and [e["key"] for e in second if e.get("shared") and e["stage"] == "P"] == p_runs
    assert not any(e.get("shared") for e in second if e["stage"] == "Q")  # P's runs all read back, no Q run
    assert second_runs.calls.count(("P", False)) == second_runs.calls.count(("P", True)) == 0
    assert ("Q", False) in second_runs.calls


def test_runs_filed_under_the_earlier_keys_are_read_back_and_filed_again(context, tmp_path, monkeypatch):
    # An earlier ordercomp hashed every setting and the whole plan into a shared run's key.
    def shared():
        return SharedProbes(tmp_path / "shared", {"settings": {"quantize": {"w_bits": 8}}}, [1, 8, 8])

    with monkeypatch.context() as patched:
        patched.setattr(SharedProbes, "key", SharedProbes.legacy_key)
        _seeded_run(_controller(2.0, shared=shared()), "PQE", context)
    legacy = {p.name for p in (tmp_path / "shared").iterdir()}
    runs, alone_runs = _FakeRuns(), _FakeRuns()
    second = _controller(1.0, runner=runs, shared=shared())
    out, _ = _seeded_run(second, "PQE", context)
    alone_out, _ = _seeded_run(_controller(1.0, runner=alone_runs), "PQE", context)
    assert [d for *_, d in out] == [d for *_, d in alone_out]
    read_back = [e["key"] for e in second.entries if e.get("shared")]
    assert {"0-full-ratio0.5", "0-probe-ratio0.5"} <= set(read_back)
    assert len(runs.calls) == len(alone_runs.calls) - len(read_back)
    # Filed again under the keys of now, models included: read back without the earlier files
    # (with the runs the second budget made, at the same budget: nothing runs again).
    for name in legacy:
        (tmp_path / "shared" / name).unlink()
    runs = _FakeRuns()
    third = _controller(1.0, runner=runs, shared=shared())
    _seeded_run(third, "PQE", context)
    assert set(read_back) < {e["key"] for e in third.entries if e.get("shared")}
    assert runs.calls == []
