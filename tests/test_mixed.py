"""Bits per layer: the allocator against a brute-force optimum, a planted sensitive layer kept at 8
bits, sensitivities measured on real digits, and the BitOps of a mixed model against a hand sum."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ordercomp import bitops, models
from ordercomp.errors import ConfigError
from ordercomp.nn import QuantLayer, quantize_model
from ordercomp.stages.mixed import allocate, assignment_bitops, layer_macs, sensitivities

OPTIONS = [(8, 8), (4, 8), (2, 8), (2, 4)]


def _brute_force(macs, sensitivity, limit):
    names = list(sensitivity)
    best = None
    for combo in itertools.product(*(list(sensitivity[n]) for n in names)):
        cost = sum(macs[n] * w * a for n, (w, a) in zip(names, combo))
        total = sum(sensitivity[n][b] for n, b in zip(names, combo))
        if cost <= limit and (best is None or total < best[0]):
            best = (total, dict(zip(names, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_allocation_is_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    macs = {f"l{i}": rng.randint(1, 9) for i in range(5)}
    sensitivity = {n: {b: rng.random() * (64 / (b[0] * b[1])) ** rng.uniform(0.5, 2) for b in OPTIONS} for n in macs}
    full = assignment_bitops(macs, {n: (8, 8) for n in macs})
    for fraction in (0.14, 0.3, 0.55, 1.0):  # the fewest bits (2w4a) take 0.125 of 8w8a
        limit = int(full * fraction)
        total, expected = _brute_force(macs, sensitivity, limit)
        chosen = allocate(macs, sensitivity, limit, resolution=limit)  # a step of 1 BitOp: no rounding
        assert assignment_bitops(macs, chosen) <= limit
        assert sum(sensitivity[n][b] for n, b in chosen.items()) == pytest.approx(total), (fraction, chosen, expected)
        coarse = allocate(macs, sensitivity, limit)  # the default steps: never over the limit, never better
        assert assignment_bitops(macs, coarse) <= limit
        assert sum(sensitivity[n][b] for n, b in coarse.items()) >= total - 1e-12


def test_a_limit_below_the_fewest_bits_is_refused():
    macs, sensitivity = {"a": 10, "b": 5}, {"a": {(2, 4): 1.0, (8, 8): 0.0}, "b": {(2, 4): 1.0, (8, 8): 0.0}}
    with pytest.raises(ConfigError, match=r"a BitOps limit of 100 cannot be met: the fewest bits of every layer take 120"):
        allocate(macs, sensitivity, 100)


def test_a_limit_of_exactly_the_fewest_bits_is_met():
    """bits_per_mac 8 (the ladder's lowest) is exactly 2w4a everywhere; with each layer's cost rounded
    up to whole steps it no longer fitted, and a budgeted run on the digits ended with "a BitOps
    limit of 4.773e+07 cannot be met: the fewest bits of every layer take 4.773e+07"."""
    macs = {"a": 1001, "b": 2003, "c": 997}
    sensitivity = {n: {(2, 4): 1.0, (3, 4): 0.5, (8, 8): 0.0} for n in macs}
    limit = 8.0 * sum(macs.values())
    assert allocate(macs, sensitivity, limit, resolution=7) == {n: (2, 4) for n in macs}
    assert allocate(macs, sensitivity, limit) == {n: (2, 4) for n in macs}
    with pytest.raises(ConfigError, match="cannot be met"):
        allocate(macs, sensitivity, limit * 0.999)


@pytest.fixture(scope="module")
def quantized(mnist_small):
    """resnet8 briefly trained on real digits, then quantized at 8w8a."""
    x_train, y_train, _, _ = mnist_small
    torch.manual_seed(0)
    model = models.create("resnet8", in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(0, 1024, 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64]).backward()
        opt.step()
    model, _ = quantize_model(model.eval(), 8, 8, example_input=x_train[:128], alpha="calibrated")
    return model.eval(), x_train


def test_sensitivities_grow_as_bits_fall_and_leave_the_model_as_it_was(quantized):
    model, x = quantized
    before = {n: (m.w_bits, m.a_bits) for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    with torch.no_grad():
        reference = model(x[:64])
    found = sensitivities(model, [x[:64], x[64:128]], OPTIONS)
    assert set(found) == set(before)
    assert {n: (m.w_bits, m.a_bits) for n, m in model.named_modules() if isinstance(m, QuantLayer)} == before
    with torch.no_grad():
        assert torch.equal(model(x[:64]), reference)
    for name, per in found.items():
        assert per[(8, 8)] == pytest.approx(0.0, abs=1e-6)  # the layer as it is: the model itself
        assert per[(2, 4)] > per[(4, 8)] > 0, (name, per)
    # Lowering a layer alone by hand gives its number.
    name = "features.layer2.0.conv1"
    layer = dict(model.named_modules())[name]
    layer.configure(2, 4)
    with torch.no_grad():
        low = torch.cat([model(x[:64]), model(x[64:128])]).log_softmax(1)
    layer.configure(8, 8)
    with torch.no_grad():
        ref = torch.cat([model(x[:64]), model(x[64:128])]).log_softmax(1)
    kl = torch.nn.functional.kl_div(low, ref, log_target=True, reduction="sum").item() / 128
    assert found[name][(2, 4)] == pytest.approx(kl, rel=1e-5)


def test_a_planted_sensitive_layer_keeps_8_bits_and_the_mixed_bitops_are_the_hand_sum(quantized):
    model, x = quantized
    macs = layer_macs(model, x[:2])
    found = sensitivities(model, [x[:64]], OPTIONS)
    planted = "features.layer2.0.conv2"
    found[planted] = {b: (0.0 if b == (8, 8) else 1e6) for b in OPTIONS}
    limit = 0.35 * assignment_bitops(macs, {n: (8, 8) for n in macs})  # room for it at 8 bits, the rest lower
    chosen = allocate(macs, found, limit)
    assert chosen[planted] == (8, 8)
    assert sum(b != (8, 8) for b in chosen.values()) >= len(chosen) // 2
    assert assignment_bitops(macs, chosen) <= limit
    # The model at those bits: its BitOps are MACs x w x a of every quantized layer (no float layer left).
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            m.configure(*chosen[name])
    try:
        profile = bitops.profile(model, x[:2])
        assert profile.bitops == pytest.approx(assignment_bitops(macs, chosen))
        assert profile.bitops == pytest.approx(sum(macs[n] * w * a for n, (w, a) in chosen.items()))
    finally:
        for m in model.modules():
            if isinstance(m, QuantLayer):
                m.configure(8, 8)


def test_auto_policy_searches_bits_per_mac_instead_of_one_bit_pair():
    from ordercomp.stages import Quantize

    assert Quantize().strengths() == {"w_bits": (8, 6, 4, 3, 2), "a_bits": (8, 6, 4)}
    auto = Quantize(policy="auto")
    assert auto.strengths() == {"bits_per_mac": (64, 48, 32, 24, 16, 12, 8)} and auto.strength() == {"bits_per_mac": 32.0}
    assert auto.at(bits_per_mac=12).label() == "Q(bits_per_mac=12)"
    with pytest.raises(ConfigError, match=r"bits_per_mac must be a number in \[8, 64\], got 4"):
        Quantize(policy="auto", bits_per_mac=4)
    with pytest.raises(ConfigError, match="with policy='auto' every layer has its own: set progressive=False"):
        Quantize(policy="auto", progressive=True)


@pytest.mark.slow
def test_compress_with_auto_bits_keeps_them_through_the_result_file_and_export(mnist_small, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    import ordercomp
    from conftest import config_of

    x_train, y_train, x_test, y_test = mnist_small
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x_test, y_test), batch_size=128)
    model = models.create("resnet8", in_channels=1)
    config = config_of("Q", {"quantize": {"policy": "auto", "bits_per_mac": 16}}, epochs=1, max_batches=3,
                       progress=False)
    result = ordercomp.compress(model, train, val, config, out=tmp_path / "run")
    info = result.report["stages"][0]["info"]
    bits = {name: tuple(b) for name, b in info["bits"].items()}
    assert len(set(bits.values())) > 1 and info["bits_per_mac"] <= 16 + 1e-9
    macs = layer_macs(result.model, x_test[:2])
    assert result.report["stages"][0]["bitops"] == pytest.approx(assignment_bitops(macs, bits))
    assert set(info["sensitivity"]) == set(bits)
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Bits per layer chosen at step 1 (Q, policy auto)" in md and "![bits_1](bits_1.png)" in md
    name, (w, a) = next(iter(bits.items()))
    assert f"| {name} | {w} | {a} | {info['sensitivity'][name]:.3g} |" in md
    assert (tmp_path / "run" / "bits_1.png").stat().st_size > 10_000
    loaded = ordercomp.load(tmp_path / "run" / "model.pt")
    assert {n: (m.w_bits, m.a_bits) for n, m in loaded.named_modules() if isinstance(m, QuantLayer)} == bits
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x_test[:64]), result.model.eval()(x_test[:64]))
    pytest.importorskip("onnxruntime")
    for mode in ("exact", "fast"):
        out = ordercomp.export(result, tmp_path / mode, mode, calibration=x_train[:256], data=(x_test, y_test))
        assert out.comparison["agreement"] >= 98.0, (mode, out.comparison)


def test_the_hessian_measure_is_the_trace_times_the_weight_change_computed_by_hand():
    from ordercomp import ops
    from ordercomp.stages.mixed import hessian_sensitivities

    torch.manual_seed(0)
    model, _ = quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 3)), 8, 8, policy="all",
                              example_input=torch.rand(8, 4))
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    layer = model[0]
    w8 = layer.quantized_weight().detach()

    def loss(w):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, layer.bias.detach()), y)

    exact = torch.autograd.functional.hessian(loss, w8).reshape(12, 12).diagonal().sum().item() / 12
    found = hessian_sensitivities(model, [(x, y)], [2, 4], samples=3000)["0"]
    for bits in (2, 4):
        change = ((ops.quantize_weight(layer.weight.detach(), bits) - w8) ** 2).sum().item()
        assert found[bits] == pytest.approx(exact * change, rel=0.1)
    assert found[2] > found[4] > 0


def test_sensitivities_with_batch_norms_re_estimated_at_each_option(quantized):
    """``recalibrate`` runs at every option before it is measured; the number is the KL of the model
    lowered and re-estimated by hand, and the model's own statistics are put back."""
    import copy

    from ordercomp.train import Trainer, TrainConfig

    model, x = quantized
    trainer = Trainer(TrainConfig(progress=False))
    norm = [(x[i:i + 64], None) for i in range(256, 384, 64)]
    calls = []

    def recalibrate(m):
        calls.append(1)
        trainer.recalibrate_bn(m, norm, len(norm))

    norms = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    found = sensitivities(model, [x[:64], x[64:128]], OPTIONS, recalibrate=recalibrate)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]
    assert len(calls) == len(layers) * len(OPTIONS)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in norms.items())
    assert not model.training
    name = "features.layer2.0.conv1"
    with torch.no_grad():
        ref = torch.cat([model(x[:64]), model(x[64:128])]).log_softmax(1)
    lowered = copy.deepcopy(model)
    dict(lowered.named_modules())[name].configure(2, 4)
    trainer.recalibrate_bn(lowered, norm, len(norm))
    lowered.eval()
    with torch.no_grad():
        low = torch.cat([lowered(x[:64]), lowered(x[64:128])]).log_softmax(1)
    kl = torch.nn.functional.kl_div(low, ref, log_target=True, reduction="sum").item() / 128
    assert found[name][(2, 4)] == pytest.approx(kl, rel=1e-5)
    # the statistics differ at 2w4a: the re-estimated number is not the plain one
    plain = sensitivities(model, [x[:64], x[64:128]], [(2, 4)])
    assert plain[name][(2, 4)] != pytest.approx(found[name][(2, 4)], rel=1e-3)


def test_q_auto_measures_on_the_8w8a_model_with_batch_norm_statistics_of_its_own(quantized, monkeypatch):
    """DoReFa rescales every weight: Q's sensitivities were measured on a reference whose batch
    norms still had the float model's statistics (the KL of the classifier at 2w4a came out 5.2 on
    a digits resnet8, against 0.02 with the statistics re-estimated). Q now re-estimates them on
    its first training batches before it measures."""
    import copy
    from types import SimpleNamespace

    from ordercomp.stages import Quantize, quantize
    from ordercomp.stages.quantize import AUTO_NORM_BATCHES
    from ordercomp.train import Trainer, TrainConfig

    monkeypatch.setattr(quantize, "AUTO_OPTIONS", OPTIONS)  # fewer options than Q's 15: a faster test
    model, x = quantized
    labels = torch.zeros(64, dtype=torch.long)
    train = [(x[i:i + 64], labels) for i in range(0, 1024, 64)]
    trainer = Trainer(TrainConfig(progress=False))
    context = SimpleNamespace(calibration=[(x[:64], labels)], device=torch.device("cpu"),
                              output=None, example_input=x[:2], train_loader=train, trainer=trainer)
    chosen, info = Quantize(policy="auto", bits_per_mac=16)._allocate(copy.deepcopy(model), context)
    own = copy.deepcopy(model)
    trainer.recalibrate_bn(own, train[:AUTO_NORM_BATCHES], AUTO_NORM_BATCHES)
    expected = sensitivities(own.eval(), [x[:64]], OPTIONS)
    assert info["sensitivity"] == {n: pytest.approx(expected[n][b], rel=1e-5) for n, b in chosen.items()}
    assert chosen == allocate(layer_macs(own, x[:2]), expected, 16 * sum(layer_macs(own, x[:2]).values()))
    stale = sensitivities(model, [x[:64]], OPTIONS)
    assert any(stale[n][(2, 4)] != pytest.approx(expected[n][(2, 4)], rel=0.1) for n in expected)
