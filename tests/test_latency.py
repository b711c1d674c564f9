"""Latency as the accuracy budget's cost: the meter's cache against the exports it made, and the
command line's ``--cost latency`` run through to its report."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from ordercomp import models
from ordercomp.nn import attach_exits, quantize_model
from ordercomp.stages import NO_EXIT
from ordercomp.stages.prune import prune_channels

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from ordercomp.deploy.latency import LatencyMeter, signature  # noqa: E402  (needs onnx)
from test_budget import MNIST_DATA, _cli  # noqa: E402


def _resnet8(seed: int):
    torch.manual_seed(seed)
    return models.create("resnet8", in_channels=1).eval()


def test_the_meter_times_an_architecture_and_precision_once():
    x = torch.randn(16, 1, 28, 28)
    meter = LatencyMeter(_resnet8(0), x, batch=1, rounds=1)
    try:
        first = meter.speedup(_resnet8(1))
        assert meter.exports == 1 and math.isfinite(first) and first > 0
        assert meter.speedup(_resnet8(2)) == first and meter.exports == 1  # other weights, same architecture
        pruned = _resnet8(1)
        prune_channels(pruned, 0.5, x[:2])
        meter.speedup(pruned.eval())
        assert meter.exports == 2
        w4, w2 = (quantize_model(_resnet8(1), bits, 8, example_input=x[:2])[0].eval() for bits in (4, 2))
        assert signature(w4) != signature(w2)
        meter.speedup(w4), meter.speedup(w2), meter.speedup(copy.deepcopy(w4))
        assert meter.exports == 4
        # An ExitNet: every threshold timed in one export, "no exit" (above 1) among them; its weights are
        # part of its key (which inputs leave where depends on them).
        net = attach_exits(_resnet8(1), ["features.layer1"], head="conv", example_input=x[:2]).eval()
        speeds = meter.speedups(net, [0.5, 0.9, NO_EXIT])
        assert list(speeds) == [0.5, 0.9, NO_EXIT] and all(v > 0 and math.isfinite(v) for v in speeds.values())
        assert meter.exports == 5 and meter.speedups(net, [0.9]) == {0.9: speeds[0.9]} and meter.exports == 5
        with torch.no_grad():
            net.heads[0][-1].weight.add_(1.0)
        meter.speedups(net, [0.9])
        assert meter.exports == 6
    finally:
        meter.close()
    with pytest.raises(ValueError, match=r"inputs must be a tensor \[N, C, H, W\] with N >= batch \(32\)"):
        LatencyMeter(_resnet8(0), x, batch=32)


@pytest.mark.slow
def test_cli_latency_budget_reports_both_costs(tmp_path):
    out = tmp_path / "run"
    proc = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--order", "QE",
                "--teacher-epochs", "1", "--epochs", "1", "--max-batches", "3", "--batch-size", "64",
                "--calibration-fraction", "0.25", "--target-loss", "3", "--max-probes", "3", "--cost", "latency",
                "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    budget = report["budget"]
    assert budget["cost"] == "latency"
    assert all(p["speedup"] > 0 for p in budget["probes"]) and all("speedup" in d for d in budget["decisions"])
    assert "costs (the budget bought measured latency): Q " in proc.stdout
    e = report["stages"][-1]
    assert e.get("heads_dropped") or all(p["speedup"] > 0 for p in e["exit_sweep"])  # E's thresholds timed too
    assert "faster" in proc.stderr  # each run's measured speed-up in the progress lines

    refused = _cli("compress", "--model", "resnet8", "--data", "npz", "--data-root", MNIST_DATA, "--cost", "latency",
                   "--out", tmp_path / "other")
    assert refused.returncode != 0 and "--cost belong to the accuracy budget and need --target-loss" in refused.stderr
