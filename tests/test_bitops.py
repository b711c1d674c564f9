"""MACs / BitOps / storage accounting against DESIGN.md's reference counts, hand sums and other counters."""

from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ordercomp import models, reference
from ordercomp.bitops import compression_ratios, exit_costs, expected_bitops, profile
from ordercomp.errors import ModelError

CIFAR = (1, 3, 32, 32)

# DESIGN.md reference: MACs (millions, within 0.1 %) and params (to the thousand), with the
# exact parameter counts of the kuangliu/pytorch-cifar models.
REFERENCE = {
    "resnet18": (555.4, 11_174_000, 11_173_962),
    "resnet34": (1159.4, 21_282_000, 21_282_122),
    "vgg19": (398.1, 20_040_000, 20_040_522),
    "mobilenetv2": (91.2, 2_297_000, 2_296_922),
}


class QConv(nn.Conv2d):
    """Stand-in for a quantized conv: the counter only reads ``w_bits`` / ``a_bits``."""

    def __init__(self, *args, w_bits=32, a_bits=32, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits, self.a_bits = w_bits, a_bits


class QLinear(nn.Linear):
    def __init__(self, *args, w_bits=32, a_bits=32, **kwargs):
        super().__init__(*args, **kwargs)
        self.w_bits, self.a_bits = w_bits, a_bits


def swap_to_stand_ins(model, bits_of):
    """Replaces every conv / linear by QConv / QLinear with ``bits_of(name)`` = (w_bits, a_bits)."""
    for name, m in list(model.named_modules()):
        if type(m) not in (nn.Conv2d, nn.Linear):
            continue
        w, a = bits_of(name)
        if isinstance(m, nn.Conv2d):
            q = QConv(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None, w_bits=w, a_bits=a)
        else:
            q = QLinear(m.in_features, m.out_features, m.bias is not None, w_bits=w, a_bits=a)
        q.load_state_dict(m.state_dict())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q)
    return model


def resnet8_layer_macs():
    """Hand-computed MACs of every conv / linear of resnet8 at 32x32x3, 10 classes."""
    return {
        "features.stem.conv": 9 * 3 * 16 * 32 * 32,
        "features.layer1.0.conv1": 9 * 16 * 16 * 32 * 32,
        "features.layer1.0.conv2": 9 * 16 * 16 * 32 * 32,
        "features.layer2.0.conv1": 9 * 16 * 32 * 16 * 16,
        "features.layer2.0.conv2": 9 * 32 * 32 * 16 * 16,
        "features.layer2.0.shortcut.0": 16 * 32 * 16 * 16,
        "features.layer3.0.conv1": 9 * 32 * 64 * 8 * 8,
        "features.layer3.0.conv2": 9 * 64 * 64 * 8 * 8,
        "features.layer3.0.shortcut.0": 32 * 64 * 8 * 8,
        "classifier.fc": 64 * 10,
    }


# resnet8's BatchNorm parameters (weight + bias): stem 16, layer1 2x16, layer2 3x32, layer3 3x64
RESNET8_BN_PARAMS = 2 * (16 + 2 * 16 + 3 * 32 + 3 * 64)
FIRST_LAST = ("features.stem.conv", "classifier.fc")


@pytest.fixture(scope="module")
def reference_runs():
    """Each reference model with its profile, built and run once for the whole module."""
    runs = {}
    for name in REFERENCE:
        model = models.create(name)
        runs[name] = (model, profile(model, torch.randn(CIFAR)))
    return runs


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_counts(reference_runs, name):
    macs_m, params_k, params_exact = REFERENCE[name]
    _, p = reference_runs[name]
    assert abs(p.macs / 1e6 - macs_m) / macs_m < 1e-3
    assert abs(p.params - params_k) < 1000 and p.params == params_exact
    assert p.bitops == p.macs * 32 * 32 and p.storage_bits == 32 * p.params
    assert p.policy == {} and all(r.status == "counted" for r in p.layers)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_same_macs_as_torch_flop_counter(reference_runs, name):
    model, p = reference_runs[name]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.randn(CIFAR))
    assert counter.get_total_flops() == 2 * p.macs


@pytest.mark.parametrize("name", list(REFERENCE))
def test_same_macs_as_torch_pruning_counter_on_conv_and_linear(reference_runs, name):
    """Torch-Pruning also counts BN, ReLU and pooling, and adds a bias term to conv (per output
    element) and linear (per output feature); restricted to conv + linear, minus the bias adds,
    it must agree with ours. Its parameter count is the same."""
    model, p = reference_runs[name]
    total, params, layer_ops, _ = tp.utils.count_ops_and_params(model, torch.randn(CIFAR), layer_wise=True)
    by_name = {r.name: r for r in p.layers}
    conv_linear = 0
    for module_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            outputs = by_name[module_name].macs // (m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups)
            conv_linear += layer_ops[m] - (outputs if m.bias is not None else 0)
        elif isinstance(m, nn.Linear):
            conv_linear += layer_ops[m] - (m.out_features if m.bias is not None else 0)
    assert conv_linear == p.macs
    assert total > p.macs and params == p.params


def test_quantized_4w8a_first_last_8w8a_matches_hand_sum(device_dtype):
    model = swap_to_stand_ins(models.create("resnet8"), lambda n: (8, 8) if n in FIRST_LAST else (4, 8))
    p = profile(device_dtype.module(model), device_dtype.randn(*CIFAR))
    macs = resnet8_layer_macs()
    first_last = sum(macs[n] for n in FIRST_LAST)
    assert p.macs == sum(macs.values())
    assert {r.name: r.macs for r in p.layers} == macs
    assert p.bitops == first_last * 8 * 8 + (sum(macs.values()) - first_last) * 4 * 8
    weights = {n: m.weight.numel() for n, m in model.named_modules() if n in macs}
    fl_weights = weights["features.stem.conv"] + weights["classifier.fc"]
    assert p.storage_bits == fl_weights * 8 + (sum(weights.values()) - fl_weights) * 4 + (10 + RESNET8_BN_PARAMS) * 32
    assert p.policy == {n: (8, 8) if n in FIRST_LAST else (4, 8) for n in macs}
    assert "4w8a: 8 layers; 8w8a: 2 layers (features.stem.conv, classifier.fc); float: 0 layers" in str(p)


def test_ordercomp_quantized_layers_are_counted_at_their_bits(device_dtype):
    qnn = pytest.importorskip("ordercomp.nn")
    model, _ = qnn.quantize_model(device_dtype.module(models.create("resnet8")), 4, 8)
    p = profile(model, device_dtype.randn(*CIFAR))
    macs = resnet8_layer_macs()
    first_last = sum(macs[n] for n in FIRST_LAST)
    assert p.policy == {n: (8, 8) if n in FIRST_LAST else (4, 8) for n in macs}
    assert p.bitops == first_last * 64 + (sum(macs.values()) - first_last) * 32


def test_compression_ratios_follow_design_definitions():
    x = torch.randn(CIFAR)
    original = models.create("resnet8")
    compressed = swap_to_stand_ins(models.create("resnet8"), lambda n: (8, 8) if n in FIRST_LAST else (4, 8))
    a, b = profile(original, x), profile(compressed, x)
    ratios = compression_ratios(original, compressed, x)
    assert ratios["bitops_cr"] == pytest.approx(a.bitops / b.bitops)
    assert ratios["cr"] == pytest.approx(32 * a.params / b.storage_bits)
    # the same ratios from the hand-computed MACs and weights of resnet8
    macs = resnet8_layer_macs()
    first_last = sum(macs[n] for n in FIRST_LAST)
    hand_bitops = first_last * 8 * 8 + (sum(macs.values()) - first_last) * 4 * 8
    assert ratios["bitops_cr"] == pytest.approx(sum(macs.values()) * 32 * 32 / hand_bitops, rel=1e-12)
    weights = {n: m.weight.numel() for n, m in original.named_modules() if n in macs}
    fl_weights = sum(weights[n] for n in FIRST_LAST)
    others = a.params - sum(weights.values())  # biases and BatchNorm stay at 32 bits
    hand_storage = fl_weights * 8 + (sum(weights.values()) - fl_weights) * 4 + others * 32
    assert ratios["cr"] == pytest.approx(32 * a.params / hand_storage, rel=1e-12)
    assert compression_ratios(a, b) == ratios
    assert compression_ratios(a, b, expected_bitops=b.bitops / 2)["bitops_cr"] == pytest.approx(2 * a.bitops / b.bitops)
    with pytest.raises(ValueError, match="example_input is needed"):
        compression_ratios(original, b)


def test_pruned_model_counts_follow_its_real_channels():
    model = models.create("resnet8")
    x = torch.randn(CIFAR)
    before = profile(model, x)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
        ignored_layers=[model.classifier.fc],
    )
    pruner.step()
    assert model.features.stem.conv.out_channels == 8 and model.classifier.fc.in_features == 32
    after = profile(model, x)
    resolution = {"stem": 32, "layer1": 32, "layer2": 16, "layer3": 8}
    expected = model.classifier.fc.in_features * model.classifier.fc.out_features
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            side = resolution[name.split(".")[1]]
            expected += m.kernel_size[0] * m.kernel_size[1] * m.in_channels * m.out_channels * side * side
    assert after.macs == expected and after.macs < before.macs / 3
    assert after.params == sum(p.numel() for p in model.parameters())


def test_conv_options_batch_and_extra_dims(device_dtype):
    dd = device_dtype
    conv = dd.module(nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=4))
    p = profile(conv, dd.randn(3, 8, 15, 15))
    assert p.layers[0].output_shape == (16, 8, 8)
    assert p.macs == 9 * (8 // 4) * 16 * 8 * 8
    assert p.params == 9 * 2 * 16 + 16
    linear = dd.module(nn.Linear(6, 4))
    assert profile(linear, dd.randn(2, 5, 6)).macs == 5 * 6 * 4
    deconv = dd.module(nn.ConvTranspose2d(4, 6, 3, stride=2))
    x = dd.randn(2, 4, 5, 5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        deconv(x)
    assert profile(deconv, x).macs == 4 * 5 * 5 * 6 * 9 == counter.get_total_flops() // 4


def test_a_module_called_twice_counts_twice(device_dtype):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    p = profile(device_dtype.module(Twice()), device_dtype.randn(1, 4))
    assert p.macs == 32 and p.layers[0].calls == 2 and "2 calls" in str(p)


def test_hooks_removed_and_modes_restored():
    model = models.create("resnet8").train()
    model.features.layer1.eval()
    user_hook = model.classifier.fc.register_forward_hook(lambda *a: None)
    profile(model, torch.randn(CIFAR))
    assert all(not m._forward_hooks for m in model.modules() if m is not model.classifier.fc)
    assert list(model.classifier.fc._forward_hooks) == [user_hook.id]
    assert model.training and model.features.layer2.training and not model.features.layer1[0].training
    assert all(p.grad is None for p in model.parameters())


class Scale(nn.Module):
    """A custom layer holding its own weight: its work is not counted."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.weight


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = Scale(3)
        self.spare = nn.Linear(3, 100)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.scale(self.fc(x)))


def test_not_run_and_not_counted_layers_are_reported():
    p = profile(Odd(), torch.randn(2, 4))
    status = {r.name: r.status for r in p.layers}
    assert status == {"fc": "counted", "scale": "not counted", "spare": "not run"}
    spare = next(r for r in p.layers if r.name == "spare")
    assert spare.macs == 0 and spare.params == 400 and spare.storage_bits == 400 * 32 and spare.calls == 0
    assert p.macs == 12 and p.params == 15 + 3 + 400 + 6
    table = str(p)
    assert "not run" in table and "not counted" in table and "Scale" in table


def test_failing_model_says_so_and_keeps_the_cause():
    model = nn.Sequential(nn.Linear(10, 5)).train()
    with pytest.raises(ModelError, match=r"Sequential failed on the example input of shape \(1, 3\).*mat1") as info:
        profile(model, torch.randn(1, 3))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert model.training and not model[0]._forward_hooks


def test_bad_arguments():
    with pytest.raises(ValueError, match="example_input must be a tensor"):
        profile(nn.Linear(2, 2), [])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        profile(lambda x: x, torch.randn(1, 2))
    bad = QLinear(2, 2, w_bits=0, a_bits=8)
    with pytest.raises(ValueError, match=r"w_bits must be in 1..32, got 0"):
        profile(bad, torch.randn(1, 2))


class TwoExits(nn.Module):
    """Hand-built exit network: 3 segments, 2 heads, forward returns every exit's logits."""

    def __init__(self):
        super().__init__()
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.segments = nn.ModuleList([
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
            nn.Sequential(*pool, nn.Linear(8, 3)),
        ])
        self.heads = nn.ModuleList([
            nn.Sequential(*pool, QLinear(4, 3, w_bits=4, a_bits=8)),
            nn.Sequential(*pool, nn.Linear(8, 3)),
        ])

    def forward(self, x):
        outs = []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            outs.append(head(x))
        return [*outs, self.segments[-1](x)]


def test_exit_costs_match_hand_computation(device_dtype):
    f = 32 * 32
    seg = [9 * 1 * 4 * 8 * 8 * f, 9 * 4 * 8 * 4 * 4 * f, 8 * 3 * f]
    head = [4 * 3 * 4 * 8, 8 * 3 * f]
    p = profile(device_dtype.module(TwoExits()), device_dtype.randn(2, 1, 8, 8))
    assert p.segment_bitops == seg and p.head_bitops == head
    costs = [seg[0] + head[0], seg[0] + head[0] + seg[1] + head[1], sum(seg) + sum(head)]
    assert p.exit_bitops == costs == exit_costs(p) == exit_costs(TwoExits(), torch.randn(1, 1, 8, 8))
    assert p.bitops == costs[-1]
    assert expected_bitops(costs, [2, 1, 1]) == pytest.approx((2 * costs[0] + costs[1] + costs[2]) / 4)
    assert expected_bitops(costs, [0.5, 0.25, 0.25]) == expected_bitops(costs, torch.tensor([2, 1, 1]))
    counters = torch.tensor([costs[0], costs[0], costs[2]], dtype=torch.float64)
    assert expected_bitops(counters=counters) == pytest.approx(sum(counters.tolist()) / 3)
    assert compression_ratios(p, p, expected_bitops=costs[0])["bitops_cr"] == pytest.approx(costs[2] / costs[0])
    assert "BitOps up to each exit" in str(p) and p.to_dict()["exit_bitops"] == costs


def test_dynamic_inference_counters_agree_with_exit_costs(device_dtype):
    """ExitNet.infer's per-input counter is the profile's cost of the exit each input left at, and the
    exits are the ones the heads' reference confidences pick (computed by hand on the whole batch)."""
    qnn = pytest.importorskip("ordercomp.nn")
    net = TwoExits()
    x = device_dtype.randn(64, 1, 8, 8)
    with torch.no_grad():  # head 0's confidences brought into head 1's range: every exit gets inputs
        net.heads[0][-1].weight.mul_(1.3)
    net = device_dtype.module(net)
    p = profile(net, x[:1])
    costs = exit_costs(p)
    exit_net = qnn.ExitNet(list(net.segments), list(net.heads)).eval()
    with torch.no_grad():
        outs = net(x)
    conf = [reference.exit_check(o, 0.0)[0].double().cpu() for o in outs[:2]]
    ranked = conf[0].sort(descending=True).values
    threshold = float(ranked[31] + ranked[32]) / 2  # half of the inputs leave at head 0
    index = torch.full((64,), 2, dtype=torch.int64)
    index[conf[1] >= threshold] = 1
    index[conf[0] >= threshold] = 0
    result = exit_net.infer(x, threshold=threshold, bitops=(p.segment_bitops, p.head_bitops))
    assert result.exit_index.cpu().tolist() == index.tolist()
    counts = result.exit_counts()
    assert counts.tolist() == [32, int((index == 1).sum()), int((index == 2).sum())]
    assert counts[1] > 0 and counts[2] > 0
    assert result.bitops.cpu().tolist() == [float(costs[k]) for k in index.tolist()]
    assert expected_bitops(counters=result.bitops) == pytest.approx(expected_bitops(costs, counts), rel=1e-12)
    hand_mean = sum(costs[k] * int(n) for k, n in enumerate(counts)) / 64
    assert expected_bitops(counters=result.bitops) == pytest.approx(hand_mean, rel=1e-12)


def test_expected_bitops_bad_input():
    with pytest.raises(ValueError, match="one entry per exit"):
        expected_bitops([1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match="distribution must be non-empty, finite and >= 0"):
        expected_bitops([1, 2], [1, -1])
    with pytest.raises(ValueError, match="not both"):
        expected_bitops([1, 2], [1, 1], counters=[3])
    with pytest.raises(ValueError, match="give exit_costs and distribution, or counters"):
        expected_bitops([1, 2])
    with pytest.raises(ValueError, match="needs an exit network"):
        exit_costs(nn.Linear(2, 2), torch.randn(1, 2))


def test_to_dict_is_json_and_table_has_totals():
    p = profile(models.create("resnet8"), torch.randn(CIFAR))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["macs"] == p.macs and d["params"] == p.params and len(d["layers"]) == 10
    assert d["layers"][0]["name"] == "features.stem.conv" and d["exit_bitops"] is None
    table = str(p)
    assert f"MACs {p.macs:,}" in table and "total" in table and "residual adds" in table


def test_cli_prints_resnet34_reference_totals(reference_runs, capsys):
    from ordercomp.cli import main

    assert main(["profile", "--model", "resnet34"]) == 0
    out = capsys.readouterr().out
    assert "MACs 1,159,402,496  params 21,282,122" in out and "features.layer4.2.conv2" in out
    assert out == f"{reference_runs['resnet34'][1]}\n"  # the table of the profile, as printed by print(profile)
    argv = ["profile", "--model", "resnet8", "--in-channels", "1", "--size", "28", "--num-classes", "5", "--json"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input_shape"] == [1, 1, 28, 28]
    expected = profile(models.create("resnet8", num_classes=5, in_channels=1), torch.zeros(1, 1, 28, 28))
    assert printed == json.loads(json.dumps(expected.to_dict()))


def test_exit_net_from_a_zoo_model_splits_the_backbone_cost():
    qnn = pytest.importorskip("ordercomp.nn")
    x = torch.randn(CIFAR)
    model = models.create("resnet8")
    backbone = profile(model, x)
    p = profile(qnn.attach_exits(model, example_input=x), x)
    assert len(p.segment_bitops) == 3 and sum(p.segment_bitops) == backbone.bitops
    assert p.head_bitops == [16 * 10 * 32 * 32, 32 * 10 * 32 * 32]
    assert p.exit_bitops[-1] == p.bitops == backbone.bitops + sum(p.head_bitops)
