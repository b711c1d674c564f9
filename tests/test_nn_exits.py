"""Exit heads, ExitNet, attach_exits (zoo-style and torch.fx splits) and dynamic inference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch_pruning as tp
from torch import nn

from ordercomp import reference
from ordercomp.nn import ConvHead, ExitNet, PoolHead, QuantConv2d, QuantLinear, attach_exits, quantize_model

X_SHAPE = (1, 8, 8)


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyZoo(nn.Module):
    """Shaped like the zoo models: classifier(features(x)) with default exit points."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 8), conv_bn(8, 16, 2), conv_bn(16, 16, 2))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(self.features(x))

    def default_exit_points(self):
        return [0, 1]


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)) + x)


class UserNet(nn.Module):
    """A user model without `features`: residual blocks and a functional head."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 8)
        self.block1 = Residual(8)
        self.down = nn.Conv2d(8, 16, 3, 2, 1)
        self.block2 = Residual(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(torch.relu(self.down(self.block1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SharedRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.relu, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.relu(self.c2(self.relu(self.c1(x)))).mean((2, 3)))


class SharedInner(nn.Module):
    """A submodule's ReLU called twice: its calls are the nodes ``inner_relu`` and ``inner_relu_1``,
    so the module name ``inner.relu`` names no node."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.inner, self.fc = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Module(), nn.Linear(4, 10)
        self.inner.relu = nn.ReLU()

    def forward(self, x):
        return self.fc(self.inner.relu(self.c2(self.inner.relu(self.c1(x)))).mean((2, 3)))


def randomise_bn(model):
    """Non-trivial BN statistics, so eval-mode outputs are not a special case."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def x():
    return torch.randn(16, *X_SHAPE)


@pytest.fixture
def zoo(x):
    model = randomise_bn(TinyZoo()).eval()
    return model, attach_exits(model, example_input=x).eval()


@pytest.fixture
def zoo_on(device_dtype):
    """TinyZoo with exits on each device / dtype: (model, net, x), the same weights and inputs in every case."""
    model = device_dtype.module(randomise_bn(TinyZoo()).eval())
    x = device_dtype.randn(16, *X_SHAPE)
    net = attach_exits(model, example_input=x).eval()
    assert all(p.device == x.device and p.dtype == x.dtype for p in net.parameters())  # heads follow the body
    return model, net, x


def spread_head(head, std=2.0):
    """New head weights drawn on the CPU (the same in every case), wide enough to spread the confidences."""
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape) * std)


def split_threshold(conf, n_leave):
    """A threshold midway between the n_leave-th and the next highest confidence: exactly n_leave
    inputs reach it, and no confidence lies within rounding error of it."""
    top = conf.double().sort(descending=True).values
    assert top[n_leave - 1] - top[n_leave] > 1e-4, "confidences too close to split"
    return float((top[n_leave - 1] + top[n_leave]) / 2)


def rows_seen(module):
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


# --------------------------------------------------------------------------- attaching


def test_forward_returns_all_exits_and_final_matches_model(zoo_on, device_dtype):
    model, net, x = zoo_on
    assert isinstance(net, ExitNet) and len(net.segments) == 3 and len(net.heads) == 2 and net.num_exits == 3
    outs = net(x)
    assert len(outs) == 3 and all(o.shape == (16, 10) and o.dtype == x.dtype for o in outs)
    torch.testing.assert_close(outs[-1], model(x), **device_dtype.tol)
    with torch.no_grad():  # each head sees the features after its segment
        f0 = model.features[0](x)
        f1 = model.features[1](f0)
    torch.testing.assert_close(outs[0], net.heads[0](f0), **device_dtype.tol)
    torch.testing.assert_close(outs[1], net.heads[1](f1), **device_dtype.tol)
    assert all(isinstance(h, PoolHead) for h in net.heads)
    assert [h.fc.in_features for h in net.heads] == [8, 16]
    assert net.classifiers() == [net.heads[0].fc, net.heads[1].fc, model.classifier[2]]
    assert net.segments[0][0] is model.features[0]  # shared, not copied


def test_conv_head_and_callable_head(x):
    model = TinyZoo().eval()
    net = attach_exits(model, [1], head="conv", example_input=x, width=4, grid=2)
    assert isinstance(net.heads[0], ConvHead) and net.heads[0].conv.out_channels == 4
    assert net.heads[0].fc.in_features == 16
    made = []

    def head(cin, classes):
        made.append((cin, classes))
        return PoolHead(cin, classes)

    attach_exits(model, [0, 2], head=head, input_size=X_SHAPE)
    assert made == [(8, 10), (16, 10)]


def test_fx_split_of_a_user_model_matches_it(device_dtype):
    model = device_dtype.module(randomise_bn(UserNet()).eval())
    x = device_dtype.randn(16, *X_SHAPE)
    net = attach_exits(model, ["block1", "relu_1"], example_input=x).eval()
    assert all(isinstance(s, torch.fx.GraphModule) for s in net.segments)
    outs = net(x)
    torch.testing.assert_close(outs[-1], model(x), **device_dtype.tol)
    assert [h.fc.in_features for h in net.heads] == [8, 16]
    with torch.no_grad():
        after_block1 = model.block1(model.stem(x))
    torch.testing.assert_close(net.segments[0](x), after_block1, **device_dtype.tol)


@pytest.mark.parametrize(
    "model,points,match",
    [
        (TinyZoo(), [3], r"feature index in 0..2, got 3"),
        (TinyZoo(), [1, 0], "strictly increasing"),
        (TinyZoo(), [0, "features.1"], "all feature indices"),
        (UserNet(), [0], "integer exit points need a model with `features`"),
        (UserNet(), ["nope"], "exit point 'nope' is neither a module nor a node"),
        (UserNet(), ["block1.conv"], "cannot split at exit point 'block1.conv'.*skip connection"),
        (UserNet(), ["block2", "block1"], "'block1' does not come after 'block2'"),
        (UserNet(), ["fc"], r"exit point 'fc' gives features of shape \(16, 10\)"),
        (UserNet(), [], "at least one exit point"),
        (SharedInner(), ["inner.relu"], r"'inner.relu' is a module that runs more than once; name a node instead: "
                                        r"\['inner_relu', 'inner_relu_1'\]"),
    ],
)
def test_bad_points_say_which_and_why(model, points, match, x):
    with pytest.raises((ValueError, TypeError), match=match):
        attach_exits(model, points, example_input=x)


def test_the_first_call_of_a_twice_run_module_is_the_node_named_after_it(x):
    """fx names the first call of the module ``relu`` the node ``relu``: a point so named cuts there."""
    model = SharedRelu().eval()
    net = attach_exits(model, ["relu"], "pool", example_input=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(net.segments[0](x), model.relu(model.c1(x)))
        torch.testing.assert_close(net(x)[-1], model(x))


def test_other_bad_arguments(x):
    with pytest.raises(ValueError, match="example_input or input_size"):
        attach_exits(TinyZoo())
    with pytest.raises(ValueError, match="head must be one of"):
        attach_exits(TinyZoo(), head="mlp", example_input=x)

    class Untraceable(TinyZoo):
        def forward(self, x):
            return self.classifier(self.features(x) if x.sum() > 0 else self.features(-x))

    with pytest.raises(ValueError, match="torch.fx cannot trace Untraceable .TraceError"):
        attach_exits(Untraceable(), ["features.0"], example_input=x)

    class Scaled(TinyZoo):
        def forward(self, x):
            return 2 * self.classifier(self.features(x))

    with pytest.raises(ValueError, match="do not reproduce"):
        attach_exits(Scaled(), [0], example_input=x)
    net = attach_exits(TinyZoo(), example_input=x)
    with pytest.raises(ValueError, match="already an ExitNet"):
        attach_exits(net, example_input=x)


# --------------------------------------------------------------------------- dynamic inference


def hand_exit_index(outs, threshold, criterion="maxprob"):
    """Where each input should leave, from every exit's logits on the whole batch: the first head whose
    reference confidence reaches the threshold, else the final classifier."""
    index = torch.full((outs[0].shape[0],), len(outs) - 1, dtype=torch.int64)
    undecided = torch.ones_like(index, dtype=torch.bool)
    for k, logits in enumerate(outs[:-1]):
        conf, _, _ = reference.exit_check(logits.detach(), 0.0, criterion)
        leave = undecided & (conf.cpu() >= threshold)
        index[leave] = k
        undecided &= ~leave
    return index


def assert_infer_follows_the_exits(net, x, threshold):
    """Dynamic inference leaves where the exits' own outputs say, with those outputs as logits."""
    with torch.no_grad():
        outs = net(x)
    index = hand_exit_index(outs, threshold)
    result = net.infer(x, threshold)
    assert result.exit_index.tolist() == index.tolist()
    for k, out in enumerate(outs):
        torch.testing.assert_close(result.logits[index == k], out[index == k], rtol=1e-5, atol=1e-5)


def test_threshold_zero_exits_everyone_at_the_first_head(zoo_on, device_dtype):
    _, net, x = zoo_on
    first = net(x)[0]
    seen = rows_seen(net.segments[1])
    result = net.infer(x, 0.0)
    assert result.exit_index.tolist() == [0] * 16
    assert result.logits.dtype == x.dtype and result.logits.device == x.device
    torch.testing.assert_close(result.logits, first, **device_dtype.tol)
    assert seen == []  # nobody reached segment 1
    assert result.exit_counts().tolist() == [16, 0, 0]


def test_threshold_above_one_runs_the_plain_backbone(zoo_on, device_dtype):
    model, net, x = zoo_on
    calls = []
    for h in net.heads:
        h.register_forward_pre_hook(lambda m, a: calls.append(1))
    result = net.infer(x, 1.5)
    assert result.exit_index.tolist() == [2] * 16
    torch.testing.assert_close(result.logits, model(x), **device_dtype.tol)
    assert calls == []  # heads are not evaluated at all


# head 1 spread so that, of the 8 inputs left after head 0, some leave at head 1 and some go on
@pytest.mark.parametrize("criterion,head1_std", [("maxprob", 3.0), ("entropy", 3.75)])
def test_inputs_leave_and_the_batch_really_shrinks(zoo_on, device_dtype, criterion, head1_std):
    model, net, x = zoo_on
    spread_head(net.heads[0])
    spread_head(net.heads[1], head1_std)
    with torch.no_grad():
        full = net(x)
    conf0, _, _ = reference.exit_check(full[0], 0.0, criterion)
    threshold = split_threshold(conf0, 8)  # half leave at head 0
    expected = hand_exit_index(full, threshold, criterion)
    counts = [int((expected == k).sum()) for k in range(3)]
    assert counts[0] == 8 and counts[1] > 0 and counts[2] > 0  # every exit is used
    seen1, seen2 = rows_seen(net.segments[1]), rows_seen(net.segments[2])
    result = net.infer(x, threshold, criterion=criterion)
    assert result.exit_index.cpu().tolist() == expected.tolist()
    assert result.exit_counts().tolist() == counts
    assert seen1 == [16 - counts[0]] and seen2 == [counts[2]]  # the batch really shrinks
    for k in range(3):  # each input's logits are those of the exit it left at, in the original order
        rows = (expected == k).to(x.device)
        torch.testing.assert_close(result.logits[rows], full[k][rows], **device_dtype.tol)
    assert torch.equal(result.predictions, result.logits.argmax(1))
    rows = (expected == 2).to(x.device)
    torch.testing.assert_close(result.logits[rows], model(x)[rows], **device_dtype.tol)


def test_bitops_counter_matches_hand_computation(zoo_on):
    _, net, x = zoo_on
    seg, head = [100.0, 200.0, 400.0], [10.0, 20.0]
    spread_head(net.heads[0])
    with torch.no_grad():
        full = net(x)
    conf0, _, _ = reference.exit_check(full[0], 0.0)
    threshold = split_threshold(conf0, 8)
    index = hand_exit_index(full, threshold)
    result = net.infer(x, threshold, bitops=(seg, head))
    assert result.exit_index.cpu().tolist() == index.tolist()
    per_exit = [seg[0] + head[0], seg[0] + head[0] + seg[1] + head[1], sum(seg) + sum(head)]
    expected = torch.tensor([per_exit[k] for k in index.tolist()], dtype=torch.float64)
    assert result.bitops.dtype == torch.float64 and result.bitops.device == x.device
    assert torch.equal(result.bitops.cpu(), expected)
    assert result.expected_bitops == pytest.approx(float(expected.mean()), rel=1e-12)
    plain = net.infer(x, 2.0, bitops=lambda n: (seg, head))  # heads skipped and free
    assert plain.bitops.tolist() == [sum(seg)] * 16
    assert net.infer(x, 0.0, bitops=(seg, head)).bitops.tolist() == [110.0] * 16


def test_infer_argument_errors(zoo, x):
    _, net = zoo
    for bad in (-0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold must be a number >= 0"):
            net.infer(x, bad)
    with pytest.raises(ValueError, match="criterion must be one of"):
        net.infer(x, 0.5, criterion="margin")
    with pytest.raises(ValueError, match="3 segment costs and 2 head costs, got 2 and 2"):
        net.infer(x, 0.5, bitops=([1, 2], [1, 2]))
    with pytest.raises(ValueError, match="bitops must be a pair"):
        net.infer(x, 0.5, bitops=5)
    assert net.infer(x, 1.0).logits.requires_grad is False


# --------------------------------------------------------------------------- training helpers, Q, P, copies


def test_freeze_backbone_trains_only_the_heads(x):
    net = attach_exits(TinyZoo(), example_input=x).freeze_backbone()
    net.train()
    assert not any(p.requires_grad for p in net.backbone_parameters())
    assert all(p.requires_grad for p in net.head_parameters())
    assert not any(m.training for m in net.segments.modules()) and net.heads[0].training
    body = copy.deepcopy(net.segments.state_dict())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    loss = sum(nn.functional.cross_entropy(o, torch.randint(0, 10, (16,))) for o in net(x))
    loss.backward()
    opt.step()
    after = net.segments.state_dict()
    assert all(torch.equal(body[k], after[k]) for k in body)  # weights and BN statistics untouched
    net.freeze_backbone(False)
    assert all(p.requires_grad for p in net.backbone_parameters()) and net.segments[0].training


def test_quantizing_an_exitnet_quantizes_the_heads(x):
    net = attach_exits(TinyZoo(), head="conv", example_input=x, width=4)
    net, report = quantize_model(net, 4, 4, example_input=x)
    assert report["segments.0.0.0"] == (8, 8) and net.segments[0][0][0].signed_input
    assert report["segments.2.classifier.2"] == (8, 8)
    assert report["heads.0.fc"] == report["heads.1.fc"] == (8, 8)  # exit classifiers are "last" layers
    assert report["heads.0.conv"] == report["segments.1.1.0"] == (4, 4)
    assert isinstance(net.heads[1].conv, QuantConv2d) and isinstance(net.heads[1].fc, QuantLinear)
    assert_infer_follows_the_exits(net.eval(), x, 0.5)


@pytest.mark.parametrize("split", ["zoo", "fx"])
def test_heads_added_after_quantization_are_quantized_too(x, split):
    model = TinyZoo() if split == "zoo" else UserNet()
    model, before = quantize_model(model, 2, 8, example_input=x)
    net = attach_exits(model, None if split == "zoo" else ["block1", "block2"], example_input=x)
    net, report = quantize_model(net, 2, 8, example_input=x)
    assert report["heads.0.fc"] == report["heads.1.fc"] == (8, 8)
    body = {k.split(".", 2)[2]: v for k, v in report.items() if k.startswith("segments.")}
    assert sorted(body.values()) == sorted(before.values())  # the body keeps its bits
    assert len(net(x)) == 3


@pytest.mark.parametrize("quantized", [False, True])
def test_pruning_an_exitnet_prunes_body_and_heads(x, quantized):
    net = attach_exits(TinyZoo(), head="conv", example_input=x)
    if quantized:
        net, _ = quantize_model(net, 4, 8, example_input=x)
    classifiers = net.classifiers()
    pruner = tp.pruner.BasePruner(
        net, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=classifiers,
        output_transform=lambda outs: sum(o.sum() for o in outs),
    )
    pruner.step()
    assert net.segments[0][0][0].out_channels == 4 and net.segments[1][0][0].out_channels == 8
    assert [h.conv.in_channels for h in net.heads] == [4, 8]
    assert [h.conv.out_channels for h in net.heads] == [4, 8]  # head convs pruned with the body
    assert [c.out_features for c in classifiers] == [10, 10, 10]
    outs = net(x)
    assert [o.shape for o in outs] == [(16, 10)] * 3
    assert_infer_follows_the_exits(net.eval(), x, 0.3)


@pytest.mark.parametrize("split", ["zoo", "fx"])
def test_deepcopy_and_state_dict(x, split):
    model = TinyZoo() if split == "zoo" else UserNet()
    points = None if split == "zoo" else ["block1", "block2"]
    net = attach_exits(model, points, example_input=x).eval()
    twin = copy.deepcopy(net)
    assert all(torch.equal(a, b) for a, b in zip(twin(x), net(x)))
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    fresh = attach_exits(TinyZoo() if split == "zoo" else UserNet(), points, example_input=x).eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert all(torch.equal(a, b) for a, b in zip(fresh(x), net(x)))


# --------------------------------------------------------------------------- exit settings the net owns


def test_attach_exits_records_how_the_heads_were_made(x):
    net = attach_exits(TinyZoo(), head="conv", example_input=x, width=4, grid=1)
    assert (net.head_kind, net.head_kwargs, net.points) == ("conv", {"width": 4, "grid": 1}, [0, 1])
    assert (net.threshold, net.criterion) == (None, "maxprob")
    fx = attach_exits(UserNet(), ["block1"], head=lambda cin, classes: PoolHead(cin, classes), example_input=x)
    assert (fx.head_kind, fx.head_kwargs, fx.points) == ("custom", {}, ["block1"])
    plain = ExitNet([nn.Identity(), nn.Identity()], [nn.Identity()], threshold=0.5, criterion="entropy")
    assert plain.get_extra_state() == {
        "threshold": 0.5, "criterion": "entropy", "head_kind": "custom", "head_kwargs": {}, "points": [],
        "output": None,
    }


@pytest.mark.parametrize("split", ["zoo", "fx"])
def test_exit_settings_survive_a_weights_only_round_trip_and_deepcopy(x, split):
    model = TinyZoo() if split == "zoo" else UserNet()
    points = None if split == "zoo" else ["block1", "block2"]
    net = attach_exits(model, points, head="conv", example_input=x, grid=1).eval()
    net.threshold, net.criterion = 0.75, "entropy"
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["_extra_state"] == {
        "threshold": 0.75, "criterion": "entropy", "head_kind": "conv", "head_kwargs": {"grid": 1},
        "points": [0, 1] if split == "zoo" else ["block1", "block2"], "output": None,
    }
    fresh = attach_exits(TinyZoo() if split == "zoo" else UserNet(), points, head="conv", example_input=x, grid=1)
    assert fresh.threshold is None
    fresh.load_state_dict(state)
    twin = copy.deepcopy(net)
    for other in (fresh.eval(), twin):
        assert (other.threshold, other.criterion, other.head_kind, other.points) == (
            0.75, "entropy", "conv", net.points,
        )
        assert torch.equal(other.infer(x).exit_index, net.infer(x, 0.75, "entropy").exit_index)
    twin.threshold = 0.1
    assert net.threshold == 0.75


def test_infer_uses_the_nets_own_threshold_and_criterion(zoo, x):
    _, net = zoo
    with pytest.raises(ValueError, match="threshold must be given: this ExitNet has no threshold chosen yet"):
        net.infer(x)
    net.threshold = 0.0
    assert net.infer(x).exit_index.tolist() == [0] * 16
    net.threshold = 2
    assert net.threshold == 2.0 and net.infer(x).exit_index.tolist() == [2] * 16
    assert net.infer(x, 0.0, "maxprob").exit_index.tolist() == [0] * 16  # arguments win over the net's own
    net.threshold = None
    assert net.threshold is None


def test_exit_settings_are_validated(zoo):
    _, net = zoo
    for bad in (-0.1, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold must be None or a number >= 0"):
            net.threshold = bad
    with pytest.raises(ValueError, match=r"criterion must be one of \('maxprob', 'entropy'\), got 'margin'"):
        net.criterion = "margin"
    with pytest.raises(ValueError, match="head_kind must be one of"):
        ExitNet([nn.Identity(), nn.Identity()], [nn.Identity()], head_kind="mlp")
    with pytest.raises(ValueError, match="head_kwargs must be a dict of plain"):
        ExitNet([nn.Identity(), nn.Identity()], [nn.Identity()], head_kwargs={"act": nn.ReLU()})
    with pytest.raises(ValueError, match="points must be a list"):
        ExitNet([nn.Identity(), nn.Identity()], [nn.Identity()], points=[1.5])
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        net.set_extra_state({"bogus": 1})
    assert (net.threshold, net.criterion) == (None, "maxprob")
