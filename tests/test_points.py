"""Automatic exit points (ordercomp.nn.points) and where a model's logits are (ordercomp.nn.outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from conftest import config_of, paying_exits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ordercomp
from ordercomp.errors import ArgumentTypeError, ConfigError, ModelError
from ordercomp.nn import attach_exits, select_logits
from ordercomp.nn.points import ExitPoint, candidate_points, choose_points, cut_positions, find_exit_points
from ordercomp.pipeline import Lineage, save_result


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


class Chain(nn.Module):
    """stem (1->4, 3x3 on 8x8), two residual blocks (4->4, 3x3), a 2x2 pool, then a linear layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.block1, self.block2 = Residual(4), Residual(4)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def test_cut_positions_are_where_only_one_value_crosses():
    graph = torch.fx.symbolic_trace(Chain()).graph
    nodes = list(graph.nodes)
    names = [nodes[i].name for i in cut_positions(nodes)]
    # inside a block the skip input crosses the conv: no cut after block1.conv or block2.conv
    assert names == ["x", "stem", "relu", "add", "relu_1", "add_1", "relu_2", "max_pool2d", "flatten", "fc"]


def test_candidates_carry_the_share_of_macs_computed_before_them():
    stem, block, fc = 64 * 4 * 9, 64 * 4 * 4 * 9, 64 * 10  # per input: 8x8 outputs x fan-in
    total = stem + 2 * block + fc
    found = candidate_points(Chain(), torch.randn(2, 1, 8, 8))
    assert [(p.name, p.node, p.shape) for p in found] == [
        ("relu", "relu", (4, 8, 8)), ("block1", "relu_1", (4, 8, 8)),
    ]  # block2's output has only the classifier after it: no point
    assert [p.macs_fraction for p in found] == pytest.approx([stem / total, (stem + block) / total])
    assert find_exit_points(Chain(), torch.randn(2, 1, 8, 8)) == ["relu", "block1"]


def test_points_are_spread_by_macs():
    points = [ExitPoint(f"p{i}", f"n{i}", f, (1, 1, 1)) for i, f in enumerate([0.1, 0.3, 0.45, 0.55, 0.8])]
    assert [p.name for p in choose_points(points, 3)] == ["p1", "p2", "p4"]  # nearest 1/4, 1/2, 3/4
    assert [p.name for p in choose_points(points, 1)] == ["p2"]
    assert [p.name for p in choose_points(points[:2], 3)] == ["p0", "p1"]
    crowded = [ExitPoint(f"p{i}", f"n{i}", f, (1, 1, 1)) for i, f in enumerate([0.1, 0.15, 0.2])]
    assert [p.name for p in choose_points(crowded + points[4:], 3)] == ["p1", "p2", "p4"]  # each after the last
    with pytest.raises(ValueError, match="count must be an integer >= 1, got 0"):
        choose_points(points, 0)


def test_untraceable_and_pointless_models_are_explained():
    class Branchy(Chain):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    with pytest.raises(ModelError, match="torch.fx cannot trace Branchy"):
        find_exit_points(Branchy(), torch.randn(2, 1, 8, 8))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ModelError, match="Sequential has no candidate exit point"):
        find_exit_points(flat, torch.randn(2, 1, 8, 8))


# --------------------------------------------------------------------------- where the logits are


def test_select_logits_reads_every_output_form():
    t = torch.randn(2, 3)
    assert select_logits(t) is t
    assert select_logits((t, "aux")) is t and select_logits([t]) is t
    assert select_logits({"logits": t, "features": None}) is t
    assert select_logits({"out": t}, "out") is t and select_logits(("aux", t), 1) is t and select_logits((t,), -1) is t
    assert select_logits({"a": {"b": t}}, lambda out: out["a"]["b"]) is t
    assert select_logits(t, "out") is t  # a tensor is the logits whatever the setting

    class Output:
        logits = t

    assert select_logits(Output(), "logits") is t


@pytest.mark.parametrize("out,output,match", [
    ({"out": 1}, None, r"cannot tell the logits in the model's output, a dict with keys \['out'\]: set output"),
    ({"out": 1}, "logits", r"output 'logits' is not a key of the model's output, a dict with keys \['out'\]"),
    ((torch.zeros(1),), 2, r"output 2 is out of range for the model's output, a tuple of 1 \(Tensor\)"),
    ({"a": 1}, 0, r"output 0 is an index, but the model returns a dict"),
    (("x", 1), None, r"gives a str as logits, not a tensor \(from a tuple of 2 \(str, int\)\)"),
    ("text", None, r"cannot tell the logits in the model's output, a str"),
])
def test_select_logits_refuses_what_it_cannot_read(out, output, match):
    with pytest.raises(ModelError, match=match):
        select_logits(out, output)


def test_a_bad_output_setting_is_refused_by_name():
    with pytest.raises(ArgumentTypeError, match=r"output must be None, a key \(str\), an index \(int\) or a callable, "
                                                r"got float 1.5"):
        select_logits({"a": 1}, 1.5)
    with pytest.raises(ArgumentTypeError, match="output must be None"):
        ordercomp.CompressConfig(output=[1])


class Named(Chain):
    """Returns its logits under a key of its own, and an auxiliary output in train mode."""

    def forward(self, x):
        out = {"scores": super().forward(x)}
        if self.training:
            out["aux"] = out["scores"] * 2
        return out


def test_exits_cut_a_model_whose_logits_are_under_a_key():
    model, x = Named().eval(), torch.randn(4, 1, 8, 8)
    with pytest.raises(ModelError, match=r"cannot tell the logits.*keys \['scores'\]"):
        attach_exits(model, example_input=x)
    net = attach_exits(model, example_input=x, output="scores").eval()
    assert net.points == ["relu", "block1"] and net.output == "scores"
    torch.testing.assert_close(net(x)[-1], model(x)["scores"])
    picked = attach_exits(model, ["block1"], example_input=x, output=lambda out: out["scores"]).eval()
    torch.testing.assert_close(picked(x)[-1], model(x)["scores"])
    assert picked.output is None  # a callable is not recorded


class Untouchable:
    """A training loader that fails if anything iterates it: errors must come before training."""

    dataset = range(64)

    def __iter__(self):
        raise AssertionError("the training data was read")


def test_compress_reads_the_logits_the_config_names(mnist_small):
    x, y = mnist_small[0][:64, :, 10:18, 10:18], mnist_small[1][:64]
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    with pytest.raises(ModelError, match=r"cannot tell the logits.*set output"):
        ordercomp.compress(Named(), Untouchable(), loader,
                           config=config_of("PE", epochs=1, max_batches=1, progress=False))
    result = ordercomp.compress(Named(), loader, loader,
                                config=config_of("PE", output="scores", epochs=1, max_batches=1, progress=False),
                                stages={"E": paying_exits()})
    assert result.model.output == "scores" and result.report["config"]["output"] == "scores"
    assert result.report["exit_points"] == {"points": ["relu", "block1"], "source": "found"}
    with pytest.raises(ConfigError, match=r"early_exit.points \['fc'\] \(given\).*candidates: relu \("):
        ordercomp.compress(Named(), Untouchable(), loader, config=config_of("DPQE", output="scores", progress=False),
                           stages={"E": ordercomp.stages.EarlyExit(points=["fc"])})


def test_exits_cut_with_a_callable_reload_when_it_is_given_again(tmp_path):
    model, x = Named().eval(), torch.randn(4, 1, 8, 8)
    net = attach_exits(model, example_input=x, output=lambda out: out["scores"]).eval()
    net.threshold = 0.5
    path = save_result(tmp_path / "net.pt", net, [1, 8, 8], Lineage.of(model))
    with pytest.raises(ModelError, match=r"cannot tell the logits.*keys \['scores'\]"):
        ordercomp.load(path, model=Named())
    again = ordercomp.load(path, model=Named(), output=lambda out: out["scores"])
    assert again.points == ["relu", "block1"] and again.threshold == 0.5
    for a, b in zip(again(x), net(x)):
        torch.testing.assert_close(a, b)


class SharedPool(nn.Module):
    """One pooling module called after two convolutions: fx names its calls ``mp`` and ``mp_1``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.c3, self.mp, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2), nn.Linear(16, 10)

    def forward(self, x):
        x = self.mp(torch.relu(self.c1(x)))
        x = self.mp(torch.relu(self.c2(x)))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_points_found_on_a_module_called_twice_cut_where_they_were_found():
    """The points found automatically are the two calls' nodes (``mp``, ``mp_1``); ``mp`` is also the
    module's name, and cutting there takes the node, not a refusal of the twice-run module."""
    x = torch.randn(2, 1, 16, 16)
    points = find_exit_points(SharedPool(), x)
    assert points == ["mp", "mp_1"]
    net = attach_exits(SharedPool(), points, "pool", example_input=x)
    with torch.no_grad():
        outs = net(x)
    assert len(outs) == 3 and all(o.shape == (2, 10) for o in outs)
